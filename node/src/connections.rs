//! Admission of connections to the node's port, and the idle clock of a client connection.
//!
//! Two bounds apply from the moment a connection is accepted: `limits.connections_max` over
//! all of them, and `limits.connections_per_address_max` per source address, so that one
//! address — a stranger's — cannot take every slot. IPv6 sources are counted per /64 (one
//! host usually holds a whole /64), IPv4-mapped IPv6 addresses as the IPv4 address. A peer
//! that proves itself with a node certificate leaves its address's count
//! ([`Admitted::leave_address_count`]): nodes often share an address with clients (loopback,
//! NAT), and the Raft links must not compete with anyone for slots.
//!
//! Invariants: an address has an entry in the count only while it has a counted connection
//! open, so the table never holds more than `connections_max` entries; every slot is given
//! back when its [`Admitted`] drops, whatever ended the connection.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

/// Why a connection was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("connections_max reached")]
    Full,
    #[error("connections_per_address_max reached for this address")]
    AddressFull,
}

impl Refused {
    /// The `rejected_inputs` reason counted for this refusal.
    pub fn reason(self) -> &'static str {
        match self {
            Refused::Full => "connections_max",
            Refused::AddressFull => "connections_per_address_max",
        }
    }
}

/// The open connections of one listener, in total and by source address.
pub struct Admission {
    all: Arc<Semaphore>,
    per_address_max: usize,
    by_address: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

impl Admission {
    pub fn new(connections_max: usize, per_address_max: usize) -> Admission {
        Admission {
            all: Arc::new(Semaphore::new(connections_max)),
            per_address_max,
            by_address: Arc::default(),
        }
    }

    /// Takes a slot for a connection from `source`, or says which bound is reached.
    pub fn admit(&self, source: IpAddr) -> Result<Admitted, Refused> {
        let key = address_key(source);
        {
            let mut counts = self.by_address.lock().expect("address count lock poisoned");
            let n = counts.entry(key).or_insert(0);
            if *n >= self.per_address_max {
                return Err(Refused::AddressFull);
            }
            *n += 1;
        }
        let address = AddressSlot {
            key,
            counts: self.by_address.clone(),
        };
        // On a full node the address slot just taken is given back as `address` drops.
        let all = self
            .all
            .clone()
            .try_acquire_owned()
            .map_err(|_| Refused::Full)?;
        Ok(Admitted {
            _all: all,
            address: Some(address),
        })
    }

    /// How many connections `source`'s address has open and counted.
    pub fn open_from(&self, source: IpAddr) -> usize {
        let counts = self.by_address.lock().expect("address count lock poisoned");
        counts.get(&address_key(source)).copied().unwrap_or(0)
    }
}

/// The key an address is counted under.
fn address_key(source: IpAddr) -> IpAddr {
    match source.to_canonical() {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => {
            let mut s = v6.segments();
            s[4..].fill(0);
            IpAddr::V6(Ipv6Addr::from(s))
        }
    }
}

/// One connection's slots; both are given back when it drops.
pub struct Admitted {
    _all: OwnedSemaphorePermit,
    address: Option<AddressSlot>,
}

impl Admitted {
    /// Gives the per-address slot back while the connection stays open (a verified peer).
    pub fn leave_address_count(&mut self) {
        self.address = None;
    }
}

struct AddressSlot {
    key: IpAddr,
    counts: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut counts = self.counts.lock().expect("address count lock poisoned");
        if let Some(n) = counts.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.key);
            }
        }
    }
}

/// When a connection last did something, and how many of its requests are in progress.
pub struct IdleClock {
    start: Instant,
    in_flight: AtomicUsize,
    last_ms: AtomicU64,
}

impl Default for IdleClock {
    fn default() -> Self {
        IdleClock {
            start: Instant::now(),
            in_flight: AtomicUsize::new(0),
            last_ms: AtomicU64::new(0),
        }
    }
}

impl IdleClock {
    fn touch(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.fetch_max(ms, Ordering::Relaxed);
    }

    /// Marks a request in progress until the guard drops.
    pub fn busy(self: &Arc<Self>) -> Busy {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        self.touch();
        Busy(self.clone())
    }

    /// Resolves once the connection has had no request in progress for `timeout`.
    pub async fn idle_for(&self, timeout: Duration) {
        loop {
            let last = self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
            let due = last + timeout;
            if self.in_flight.load(Ordering::SeqCst) == 0 && Instant::now() >= due {
                return;
            }
            // Busy or touched since: look again one timeout later at the latest.
            tokio::time::sleep_until(due.max(Instant::now() + timeout / 4)).await;
        }
    }
}

/// A request in progress on a connection (see [`IdleClock::busy`]).
pub struct Busy(Arc<IdleClock>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.touch();
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("an address")
    }

    #[test]
    fn one_address_cannot_take_every_slot() {
        let a = Admission::new(4, 2);
        let x1 = a.admit(ip("10.0.0.1")).expect("first");
        let _x2 = a.admit(ip("10.0.0.1")).expect("second");
        assert_eq!(a.admit(ip("10.0.0.1")).err(), Some(Refused::AddressFull));
        let _y1 = a.admit(ip("10.0.0.2")).expect("another address");
        drop(x1);
        let _x3 = a
            .admit(ip("10.0.0.1"))
            .expect("a slot given back is free again");
        let _y2 = a
            .admit(ip("10.0.0.2"))
            .expect("second of the other address");
        assert_eq!(a.admit(ip("10.0.0.3")).err(), Some(Refused::Full));
        // Refused by the total: the address slot it took is given back.
        assert_eq!(a.open_from(ip("10.0.0.3")), 0);
    }

    #[test]
    fn a_verified_peer_leaves_the_count_and_the_table_empties() {
        let a = Admission::new(8, 1);
        let mut peer = a.admit(ip("127.0.0.1")).expect("peer");
        peer.leave_address_count();
        let client = a.admit(ip("127.0.0.1")).expect("the address is free again");
        assert_eq!(a.open_from(ip("127.0.0.1")), 1);
        drop(client);
        drop(peer);
        assert!(a.by_address.lock().expect("lock").is_empty());
    }

    #[test]
    fn ipv6_counts_per_64_and_mapped_ipv4_as_ipv4() {
        let a = Admission::new(8, 1);
        let _x = a.admit(ip("2001:db8:1:2::1")).expect("first");
        assert_eq!(
            a.admit(ip("2001:db8:1:2:ffff::9")).err(),
            Some(Refused::AddressFull),
            "another host of the same /64"
        );
        let _y = a.admit(ip("2001:db8:1:3::1")).expect("another /64");
        let _z = a.admit(ip("192.0.2.7")).expect("ipv4");
        assert_eq!(
            a.admit(ip("::ffff:192.0.2.7")).err(),
            Some(Refused::AddressFull)
        );
    }

    #[tokio::test]
    async fn a_request_in_progress_is_not_idle() {
        let timeout = Duration::from_millis(100);
        let clock = Arc::new(IdleClock::default());
        let busy = clock.busy();
        let idle = tokio::time::timeout(Duration::from_millis(500), clock.idle_for(timeout)).await;
        assert!(
            idle.is_err(),
            "a connection busy for 5 timeouts is not idle"
        );
        drop(busy);
        let start = Instant::now();
        clock.idle_for(timeout).await;
        assert!(
            start.elapsed() >= timeout,
            "idle only a timeout after the request"
        );
    }
}
