//! Owned background work: every long-lived task of a node (its loops, the connections it
//! serves, the proposals and sandbox runs it starts) is spawned into one [`Background`] and
//! watches one shutdown signal.
//!
//! The shape is the usual one for a server that must be proven stopped: a `watch` channel is
//! the signal (each loop `select!`s on [`Shutdown::wait`] beside its own work), and a `JoinSet`
//! holds the join handle of every task spawned through [`Background::spawn`].
//!
//! Invariants:
//! - [`Background::stop`] returns only when every task it owns has ended: the ones that heed
//!   the signal within the bound it is given, the rest aborted (and counted, so a loop that
//!   ignores the signal shows up in the log and in tests);
//! - a task spawned after the signal sees it at once ([`Shutdown::is_set`] is already true).

use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinSet;

/// One task's view of the shutdown signal.
#[derive(Clone)]
pub struct Shutdown {
    rx: watch::Receiver<bool>,
}

impl Shutdown {
    /// Whether the signal has been given.
    pub fn is_set(&self) -> bool {
        *self.rx.borrow()
    }

    /// Resolves once the signal is given (at once if it already was).
    pub async fn wait(&mut self) {
        // An error means the sender is gone, which only happens when the owner is dropped:
        // that is a shutdown too.
        let _ = self.rx.wait_for(|stopping| *stopping).await;
    }
}

struct Inner {
    signal: watch::Sender<bool>,
    tasks: Mutex<JoinSet<()>>,
}

/// The owner of a node's background tasks; cheap to clone.
#[derive(Clone)]
pub struct Background {
    inner: Arc<Inner>,
}

impl Default for Background {
    fn default() -> Self {
        Background::new()
    }
}

impl Background {
    pub fn new() -> Background {
        let (signal, _) = watch::channel(false);
        Background {
            inner: Arc::new(Inner {
                signal,
                tasks: Mutex::new(JoinSet::new()),
            }),
        }
    }

    /// A view of the shutdown signal for a task to select on.
    pub fn shutdown(&self) -> Shutdown {
        Shutdown {
            rx: self.inner.signal.subscribe(),
        }
    }

    /// Whether the signal has been given.
    pub fn stopping(&self) -> bool {
        *self.inner.signal.borrow()
    }

    /// Spawns `task` as one of this owner's; its handle is kept until it ends.
    pub fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        let mut tasks = self.tasks();
        // Reap what has ended, so a long-lived node does not accumulate finished handles.
        while tasks.try_join_next().is_some() {}
        tasks.spawn(task);
    }

    /// Spawns `work` as one of this owner's tasks, dropped where it stands when the signal is
    /// given: for one-off work (a sandbox run, a report, a pre-warm, a dispatch) that has
    /// nothing to finish once the node stops, as if the process had exited under it.
    pub fn spawn_until_shutdown(&self, work: impl Future<Output = ()> + Send + 'static) {
        let mut shutdown = self.shutdown();
        self.spawn(async move {
            tokio::select! {
                () = work => {}
                () = shutdown.wait() => {}
            }
        });
    }

    /// How many of this owner's tasks have not ended yet.
    pub fn live(&self) -> usize {
        let mut tasks = self.tasks();
        while tasks.try_join_next().is_some() {}
        tasks.len()
    }

    /// Gives the signal, waits up to `bound` for every task to end, aborts the ones still
    /// running then, and waits for those too. Returns how many had to be aborted.
    pub async fn stop(&self, bound: Duration) -> usize {
        self.inner.signal.send_replace(true);
        let deadline = tokio::time::Instant::now() + bound;
        let mut aborted = 0;
        loop {
            // Taken out of the lock to be awaited; a task spawned meanwhile (it sees the
            // signal at once) lands in the fresh set and is joined on the next turn.
            let mut tasks = std::mem::take(&mut *self.tasks());
            if tasks.is_empty() {
                return aborted;
            }
            while !tasks.is_empty() {
                match tokio::time::timeout_at(deadline, tasks.join_next()).await {
                    Ok(Some(ended)) => log_panic(ended),
                    Ok(None) => break,
                    Err(_) => {
                        aborted += tasks.len();
                        tasks.abort_all();
                        while tasks.join_next().await.is_some() {}
                    }
                }
            }
        }
    }

    fn tasks(&self) -> MutexGuard<'_, JoinSet<()>> {
        // A panic while holding this lock cannot leave the set inconsistent: every operation
        // on it is a single call.
        self.inner
            .tasks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

fn log_panic(ended: Result<(), tokio::task::JoinError>) {
    if let Err(e) = ended {
        if e.is_panic() {
            tracing::error!(error = %e, "a background task panicked");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn stop_waits_for_tasks_that_heed_the_signal_and_aborts_the_rest() {
        let owner = Background::new();
        let mut shutdown = owner.shutdown();
        owner.spawn(async move { shutdown.wait().await });
        owner.spawn(std::future::pending());
        owner.spawn_until_shutdown(std::future::pending());
        assert_eq!(owner.live(), 3);
        let aborted = owner.stop(Duration::from_millis(100)).await;
        assert_eq!(aborted, 1, "only the task ignoring the signal is aborted");
        assert_eq!(owner.live(), 0);
        assert!(owner.shutdown().is_set(), "a later view sees the signal");
    }
}
