//! Fuzzes what skiff reads from outside: the request frames a node decodes from any client
//! (before it knows who the client is), and the manifests, code archives and settings the
//! command line parses.
//!
//! Every case must end (an item, an error or the end of the stream; `Ok` or a one-line
//! `Err`) within [`CASE_TIMEOUT`], must not panic, and must not hold more heap at once than a
//! bound stated next to each property. The heap is measured by [`heap::Counting`], this
//! binary's global allocator, which is why this is a test binary of its own rather than a
//! module of an `it` binary: an allocator is process-wide.
//!
//! Knobs (environment variables):
//! - `SKIFF_FUZZ_CASES`: cases per property (default [`CASES_DEFAULT`], which keeps the whole
//!   binary to about 10 s on two cores in a debug build, as the README's test command runs it
//!   in CI); raise it for a longer run, e.g. `SKIFF_FUZZ_CASES=20000` (nextest ends a test
//!   after 4 minutes, `.config/nextest.toml`; past that use `cargo test --test fuzz`);
//! - `PROPTEST_RNG_SEED`: replays a run; each property prints the seed it drew otherwise.
//!
//! Failures are not persisted to files (`failure_persistence: None`): proptest prints the
//! shrunk input, which belongs in a named regression test here, not in a file written into
//! the source tree by whichever machine found it.

use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config, RngSeed, TestCaseError, TestRunner};
use skiff_client::api::{
    ClientApiRequest, ClientApiResponse, ClientCommand, Command, InvokeRequest, ReadConsistency,
    RequestId, Role, StreamOptions, StreamSource, StreamStartRequest, TaskFilter, TaskState,
};
use skiff_client::deploy::{
    check_archive, parse_duration_ms, parse_env, parse_manifest, parse_size, single_file_archive,
    split_entry, MANIFEST_BYTES_MAX,
};
use skiff_client::transport::framed;
use tarpc::{ClientMessage, Response};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The test's frame bound: small, so that anything sized by what a frame claims rather than
/// by what it holds stands out against it. Nodes use the same code with a larger bound.
const FRAME_BYTES_MAX: usize = 64 * 1024;

/// How long one case may take before it counts as a hang. Generous: the machine may be busy
/// with other builds, and a real hang never ends.
const CASE_TIMEOUT: Duration = Duration::from_secs(10);

/// Cases per property unless `SKIFF_FUZZ_CASES` says otherwise.
const CASES_DEFAULT: u32 = 512;

mod heap {
    //! A global allocator that counts the live heap bytes of each thread and the most it
    //! held at once since [`measured`] started.
    //!
    //! Per thread rather than process-wide so that tests running at the same time (as
    //! `cargo test` runs them, in threads) do not count each other's memory; every case
    //! runs on a thread of its own ([`super::on_own_thread`]).
    //!
    //! The one `unsafe` outside `sandbox/src/sys/`, and test-only: a global allocator
    //! cannot be written without it.

    use std::alloc::{GlobalAlloc, Layout, System};

    use super::Cell;

    thread_local! {
        // Const-initialized and without destructors: reading them never allocates, which an
        // allocator's bookkeeping must not.
        static LIVE_BYTES: Cell<isize> = const { Cell::new(0) };
        static PEAK_BYTES: Cell<isize> = const { Cell::new(0) };
    }

    fn grew(bytes: usize) {
        let _ = LIVE_BYTES.try_with(|live| {
            let now = live.get().saturating_add_unsigned(bytes);
            live.set(now);
            let _ = PEAK_BYTES.try_with(|peak| peak.set(peak.get().max(now)));
        });
    }

    fn shrank(bytes: usize) {
        let _ = LIVE_BYTES.try_with(|live| live.set(live.get().saturating_sub_unsigned(bytes)));
    }

    /// [`System`], counting.
    pub struct Counting;

    // SAFETY: every method hands its arguments unchanged to `System` and returns what
    // `System` returned, so `System`'s guarantees are this allocator's; the bookkeeping
    // around the calls only touches this thread's counters and never allocates.
    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            // SAFETY: the caller upholds `alloc`'s contract, which is `System`'s.
            let ptr = unsafe { System.alloc(layout) };
            if !ptr.is_null() {
                grew(layout.size());
            }
            ptr
        }

        unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
            // SAFETY: as for `alloc`.
            let ptr = unsafe { System.alloc_zeroed(layout) };
            if !ptr.is_null() {
                grew(layout.size());
            }
            ptr
        }

        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            // SAFETY: `ptr` came from this allocator, that is from `System`, with `layout`.
            unsafe { System.dealloc(ptr, layout) };
            shrank(layout.size());
        }

        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            // SAFETY: `ptr` came from `System` with `layout`; the caller upholds the rest.
            let new = unsafe { System.realloc(ptr, layout, new_size) };
            if !new.is_null() {
                shrank(layout.size());
                grew(new_size);
            }
            new
        }
    }

    /// Runs `work` and returns its value with the most heap this thread held at once while
    /// it ran, beyond what it held before (the value counts while it is alive).
    pub fn measured<T>(work: impl FnOnce() -> T) -> (T, usize) {
        let before = LIVE_BYTES.with(Cell::get);
        PEAK_BYTES.with(|peak| peak.set(before));
        let value = work();
        let peak = PEAK_BYTES.with(Cell::get);
        (value, usize::try_from(peak - before).unwrap_or(0))
    }
}

#[global_allocator]
static ALLOCATOR: heap::Counting = heap::Counting;

/// Runs `case` on a thread of its own and waits at most [`CASE_TIMEOUT`] for it: a panic or a
/// hang is an `Err` naming it.
fn on_own_thread<T: Send + 'static>(
    case: impl FnOnce() -> T + Send + 'static,
) -> Result<T, String> {
    on_own_thread_within(CASE_TIMEOUT, case)
}

/// [`on_own_thread`] with another timeout. A hung thread is left behind: nothing can stop it,
/// and the process ends with the test.
fn on_own_thread_within<T: Send + 'static>(
    timeout: Duration,
    case: impl FnOnce() -> T + Send + 'static,
) -> Result<T, String> {
    let (done, outcome) = mpsc::sync_channel(1);
    let thread = std::thread::Builder::new()
        .name("fuzz-case".into())
        .spawn(move || {
            let _ = done.send(case());
        })
        .map_err(|e| format!("cannot start a case thread: {e}"))?;
    match outcome.recv_timeout(timeout) {
        Ok(value) => {
            let _ = thread.join();
            Ok(value)
        }
        Err(mpsc::RecvTimeoutError::Timeout) => {
            Err(format!("the case did not finish within {timeout:?}"))
        }
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            let payload = thread.join().err();
            let message = payload
                .as_ref()
                .and_then(|p| {
                    p.downcast_ref::<String>()
                        .cloned()
                        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                })
                .unwrap_or_else(|| "a panic without a message".into());
            Err(format!("the case panicked: {message}"))
        }
    }
}

/// The runner's settings: `SKIFF_FUZZ_CASES` cases, no files written on failure, a seed that
/// is printed so that a failure can be replayed.
fn config() -> Config {
    let cases = match std::env::var("SKIFF_FUZZ_CASES") {
        Ok(text) => text
            .parse()
            .unwrap_or_else(|_| panic!("SKIFF_FUZZ_CASES={text:?} is not a number of cases")),
        Err(_) => CASES_DEFAULT,
    };
    let mut config = Config {
        cases,
        failure_persistence: None,
        // A failing case may be slow (a hang takes CASE_TIMEOUT each time): shrink for a
        // bounded time and report what was found by then.
        max_shrink_time: 60_000,
        ..Config::default()
    };
    if config.rng_seed == RngSeed::Random {
        config.rng_seed = RngSeed::Fixed(rand::random());
    }
    config
}

/// What the cases of one property did, printed when it ends (run with `--no-capture`).
#[derive(Default)]
struct Tally {
    cases: Cell<u64>,
    peak_bytes_max: Cell<usize>,
    /// The measured run that came closest to its bound: (peak, bound).
    closest: Cell<(usize, usize)>,
    slowest: Cell<Duration>,
}

impl Tally {
    fn note(&self, peak_bytes: usize, bound_bytes: usize, took: Duration) {
        self.peak_bytes_max
            .set(self.peak_bytes_max.get().max(peak_bytes));
        let (peak, bound) = self.closest.get();
        // peak_bytes / bound_bytes > peak / bound, without division.
        if bound == 0 || peak_bytes as u128 * bound as u128 > peak as u128 * bound_bytes as u128 {
            self.closest.set((peak_bytes, bound_bytes));
        }
        self.slowest.set(self.slowest.get().max(took));
    }
}

/// Runs one case on a thread of its own and checks that it ended, did not panic, and held at
/// most `bound_bytes` of heap in the part it measured (`case` returns its value and that
/// peak, so that its setup does not count).
fn check_case<T: Send + 'static>(
    tally: &Tally,
    what: &str,
    bound_bytes: usize,
    case: impl FnOnce() -> (T, usize) + Send + 'static,
) -> Result<T, TestCaseError> {
    let started = Instant::now();
    let (value, peak_bytes) =
        on_own_thread(case).map_err(|e| TestCaseError::fail(format!("{what}: {e}")))?;
    tally.note(peak_bytes, bound_bytes, started.elapsed());
    prop_assert!(
        peak_bytes <= bound_bytes,
        "{} held {} bytes of heap at once; the bound is {}",
        what,
        peak_bytes,
        bound_bytes
    );
    Ok(value)
}

/// Runs `property` over `strategy` and panics with proptest's report if a case fails.
fn fuzz<S: Strategy>(
    name: &str,
    strategy: S,
    property: impl Fn(S::Value, &Tally) -> Result<(), TestCaseError>,
) {
    let config = config();
    let seed = config.rng_seed;
    let cases = config.cases;
    let mut runner = TestRunner::new(config);
    let tally = Tally::default();
    let started = Instant::now();
    let result = runner.run(&strategy, |value| {
        tally.cases.set(tally.cases.get() + 1);
        property(value, &tally)
    });
    let (peak, bound) = tally.closest.get();
    eprintln!(
        "{name}: {} cases ({cases} required) in {:.1?}, seed {seed} (PROPTEST_RNG_SEED); \
         heap peak at most {} bytes, closest to its bound {peak} of {bound} bytes; slowest \
         case {:.1?}",
        tally.cases.get(),
        started.elapsed(),
        tally.peak_bytes_max.get(),
        tally.slowest.get(),
    );
    if let Err(e) = result {
        panic!("{name}: {e}");
    }
}

// ---------------------------------------------------------------------------------------
// Request decoding
// ---------------------------------------------------------------------------------------

/// What a node receives on a client connection, and what it sends back.
type Incoming = ClientMessage<ClientApiRequest>;
type Outgoing = Response<ClientApiResponse>;

/// What decoding a wire gave.
struct Decoded {
    /// Frames decoded into a request.
    frames: usize,
    /// The first of them, kept to compare with what was sent.
    first: Option<Incoming>,
    /// The error that ended the stream, if one did (else it ended with the input).
    error: Option<String>,
}

impl std::fmt::Debug for Decoded {
    // Without the request itself, which may be large.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Decoded")
            .field("frames", &self.frames)
            .field("error", &self.error)
            .finish_non_exhaustive()
    }
}

/// Encodes `messages` as a client sends them, with a frame bound of `frame_bytes_max`.
fn encode(messages: Vec<Incoming>, frame_bytes_max: usize) -> Vec<u8> {
    futures::executor::block_on(async {
        // In memory; large enough for every message this file builds, so a send never waits.
        let (client, mut node) = tokio::io::duplex(16 * frame_bytes_max);
        let mut transport = framed::<_, Outgoing, Incoming>(client, frame_bytes_max);
        for message in messages {
            transport
                .send(message)
                .await
                .expect("a built request encodes");
        }
        drop(transport);
        let mut wire = Vec::new();
        node.read_to_end(&mut wire).await.expect("read back");
        wire
    })
}

/// Decodes `wire` as a node decodes a client connection (through [`framed`], over an
/// in-memory stream that ends after it), and measures the heap held while it does.
fn decode(wire: &[u8], frame_bytes_max: usize) -> (Decoded, usize) {
    let (mut client, node) = tokio::io::duplex(wire.len().max(1));
    futures::executor::block_on(client.write_all(wire)).expect("the stream holds the wire");
    drop(client);
    heap::measured(move || {
        futures::executor::block_on(async move {
            let mut transport = framed::<_, Incoming, Outgoing>(node, frame_bytes_max);
            let mut decoded = Decoded {
                frames: 0,
                first: None,
                error: None,
            };
            while let Some(item) = transport.next().await {
                match item {
                    Ok(message) => {
                        decoded.frames += 1;
                        decoded.first.get_or_insert(message);
                    }
                    Err(e) => {
                        decoded.error = Some(e.to_string());
                        break;
                    }
                }
            }
            decoded
        })
    })
}

/// The most heap one decode may hold at once, for any input, with frames of at most
/// [`FRAME_BYTES_MAX`]:
/// - the frame being read (the codec's buffer grows to hold it: twice the frame);
/// - what is decoded from it: a request may take more memory than its encoding (a command of
///   5 bytes on the wire is 112 in memory, an empty string of 1 byte is 24, and a growing
///   `Vec` reserves up to twice its length: about 48 bytes per byte of frame at most), so 64
///   bytes per byte of frame;
/// - what serde reserves ahead for a sequence on the word of its length prefix, which is
///   capped at 1 MiB whatever the prefix claims (serde's `size_hint::cautious`).
///
/// What this catches is anything sized by what a frame claims rather than by what it holds:
/// a claimed 2^40 bytes would be far past it.
const DECODE_HEAP_BYTES_MAX: usize = 2 * FRAME_BYTES_MAX + 64 * FRAME_BYTES_MAX + (1 << 20);

/// Decodes `wire` as a case: it ends, does not panic, and stays within
/// [`DECODE_HEAP_BYTES_MAX`].
fn decode_checked(wire: Vec<u8>, tally: &Tally) -> Result<Decoded, TestCaseError> {
    let what = format!("decoding {} bytes", wire.len());
    check_case(tally, &what, DECODE_HEAP_BYTES_MAX, move || {
        decode(&wire, FRAME_BYTES_MAX)
    })
}

fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z0-9/_.-]{0,24}",
        // Any characters: several bytes each in UTF-8.
        ".{0,8}",
    ]
}

fn request_id() -> impl Strategy<Value = RequestId> {
    (any::<u64>(), any::<u64>()).prop_map(|(client, seq)| RequestId { client, seq })
}

fn read() -> impl Strategy<Value = ReadConsistency> {
    prop_oneof![
        Just(ReadConsistency::Linearizable),
        Just(ReadConsistency::Local)
    ]
}

fn bytes(len_max: usize) -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 0..=len_max)
}

/// Specs as deploys carry them: a plain function and a staged one, from manifests.
fn spec() -> impl Strategy<Value = skiff_client::api::FunctionSpec> {
    let plain = parse_manifest(MANIFEST_PLAIN, &manifest_dir(), None)
        .expect("the plain manifest parses")
        .spec;
    let staged = parse_manifest(MANIFEST_STAGED, &manifest_dir(), None)
        .expect("the staged manifest parses")
        .spec;
    (
        prop::sample::select(vec![plain, staged]),
        text(),
        "[0-9a-f]{64}",
        prop::collection::vec(text(), 0..4),
    )
        .prop_map(|(base, name, code_digest, entry)| {
            let mut spec = base;
            spec.name = name;
            spec.code_digest = code_digest;
            if !spec.is_staged() {
                spec.entry = entry;
            }
            spec
        })
}

fn command() -> impl Strategy<Value = Command> {
    prop_oneof![
        (text(), bytes(256), any::<Option<u64>>()).prop_map(|(key, value, expect_version)| {
            Command::KvPut {
                key,
                value,
                expect_version,
            }
        }),
        (text(), any::<Option<u64>>()).prop_map(|(key, expect_version)| Command::KvDelete {
            key,
            expect_version
        }),
        ("[0-9a-f]{64}", any::<u64>(), any::<u32>(), bytes(4096)).prop_map(
            |(digest, total_bytes, index, bytes)| Command::CodeChunk {
                digest,
                total_bytes,
                index,
                bytes,
            }
        ),
        spec().prop_map(|spec| Command::FnDeploy {
            spec: Box::new(spec)
        }),
        text().prop_map(|name| Command::FnRemove { name }),
        (
            text(),
            any::<Option<u64>>(),
            bytes(512),
            any::<bool>(),
            prop::option::of((
                prop::option::of(text()),
                prop::collection::vec((text(), text()), 0..3)
            ))
        )
            .prop_map(|(function, version, payload, sync, idempotency)| {
                Command::Submit {
                    function,
                    version,
                    payload,
                    sync,
                    idempotency: idempotency.map(|(key, tokens)| {
                        Box::new(skiff_proto::functions::IdempotencyInput {
                            key,
                            tokens,
                            files: Vec::new(),
                        })
                    }),
                }
            }),
        text().prop_map(|name| Command::FnPurgeCache { name }),
    ]
}

fn client_command() -> impl Strategy<Value = ClientCommand> {
    (request_id(), command()).prop_map(|(request_id, command)| ClientCommand {
        request_id,
        command,
    })
}

fn invoke_request() -> impl Strategy<Value = InvokeRequest> {
    (
        request_id(),
        text(),
        any::<Option<u64>>(),
        bytes(2048),
        any::<bool>(),
        prop::option::of(text()),
        prop::collection::vec((text(), text()), 0..4),
    )
        .prop_map(
            |(request_id, function, version, payload, wait, idempotency_key, tokens)| {
                InvokeRequest {
                    request_id,
                    function,
                    version,
                    payload,
                    wait,
                    idempotency_key,
                    tokens,
                    files: Vec::new(),
                }
            },
        )
}

fn stream_start_request() -> impl Strategy<Value = StreamStartRequest> {
    let source = prop_oneof![
        (text(), any::<bool>()).prop_map(|(prefix, follow)| StreamSource::Kv { prefix, follow }),
        text().prop_map(|path| StreamSource::Jsonl { path }),
        text().prop_map(|path| StreamSource::Csv { path }),
        text().prop_map(|path| StreamSource::Dir { path }),
    ];
    (
        text(),
        source,
        any::<u32>(),
        any::<u32>(),
        prop::option::of(text()),
    )
        .prop_map(
            |(function, source, max_concurrency, batch, results_prefix)| StreamStartRequest {
                function,
                source,
                options: StreamOptions {
                    max_concurrency,
                    batch,
                    results_prefix,
                    ..StreamOptions::default()
                },
            },
        )
}

fn role() -> impl Strategy<Value = Role> {
    prop::sample::select(Role::ALL.to_vec())
}

/// A message encoded as a client sends it, and the shape it must decode to.
#[derive(Debug, Clone)]
struct Sent {
    shape: String,
    /// One frame.
    wire: Vec<u8>,
}

impl Sent {
    fn new(message: Incoming) -> Sent {
        Sent {
            shape: shape(&message),
            wire: encode(vec![message], FRAME_BYTES_MAX),
        }
    }
}

/// Requests of one kind, made by `build` from what `args` draws, with a fresh context as
/// clients make them. Encoded at once: a strategy's values must be `Clone`, and the generated
/// request type is not.
fn kind<A>(args: A, build: fn(A::Value) -> ClientApiRequest) -> BoxedStrategy<Sent>
where
    A: Strategy + 'static,
{
    (any::<u64>(), args)
        .prop_map(move |(id, args)| {
            Sent::new(ClientMessage::Request(tarpc::Request {
                context: tarpc::context::current(),
                id,
                message: build(args),
            }))
        })
        .boxed()
}

/// One request of every kind the service has, with representative arguments, or a
/// cancellation.
fn message() -> impl Strategy<Value = Sent> {
    prop_oneof![
        kind(prop::collection::vec(client_command(), 0..6), |commands| {
            ClientApiRequest::Write {
                commands: commands.into(),
            }
        }),
        kind((text(), read()), |(key, read)| ClientApiRequest::KvGet {
            key,
            read
        }),
        kind(
            (text(), prop::option::of(text()), any::<u32>(), read()),
            |(prefix, start_after, limit, read)| ClientApiRequest::KvList {
                prefix,
                start_after,
                limit,
                read,
            }
        ),
        kind(
            (
                prop::collection::btree_map(any::<u64>(), text(), 0..4),
                text()
            ),
            |(members, admin_token)| ClientApiRequest::ClusterInit {
                members,
                admin_token,
            }
        ),
        kind((any::<u64>(), text()), |(id, addr)| {
            ClientApiRequest::ClusterAddNode { id, addr }
        }),
        kind(any::<u64>(), |id| ClientApiRequest::ClusterRemoveNode {
            id
        }),
        kind(Just(()), |()| ClientApiRequest::ClusterStatus {}),
        kind(invoke_request(), |req| ClientApiRequest::Invoke { req }),
        kind((any::<u64>(), read()), |(id, read)| {
            ClientApiRequest::TaskGet { id, read }
        }),
        kind(
            (
                prop::option::of(text()),
                prop::option::of(Just(TaskState::Failed)),
                any::<bool>(),
                any::<u64>(),
                any::<u32>(),
                read()
            ),
            |(function, state, dead_letter, after, limit, read)| ClientApiRequest::TaskList {
                filter: TaskFilter {
                    function,
                    state,
                    dead_letter,
                },
                after,
                limit,
                read,
            }
        ),
        kind((text(), read()), |(name, read)| ClientApiRequest::FnGet {
            name,
            read
        }),
        kind(read(), |read| ClientApiRequest::FnList { read }),
        kind(read(), |read| ClientApiRequest::Workers { read }),
        kind(
            (request_id(), stream_start_request()),
            |(request_id, req)| { ClientApiRequest::StreamStart { request_id, req } }
        ),
        kind((any::<u64>(), read()), |(id, read)| {
            ClientApiRequest::StreamGet { id, read }
        }),
        kind(read(), |read| ClientApiRequest::StreamList { read }),
        kind((request_id(), any::<u64>()), |(request_id, id)| {
            ClientApiRequest::StreamCancel { request_id, id }
        }),
        kind((request_id(), any::<u64>()), |(request_id, id)| {
            ClientApiRequest::StreamRedrive { request_id, id }
        }),
        kind((any::<Option<u64>>(), any::<u64>()), |(export, offset)| {
            ClientApiRequest::BackupChunk { export, offset }
        }),
        kind((role(), prop::option::of(text())), |(role, name)| {
            ClientApiRequest::TokenCreate { role, name }
        }),
        kind(read(), |read| ClientApiRequest::TokenList { read }),
        kind((request_id(), any::<u64>()), |(request_id, id)| {
            ClientApiRequest::TokenRevoke { request_id, id }
        }),
        any::<u64>()
            .prop_map(|request_id| Sent::new(ClientMessage::Cancel {
                trace_context: tarpc::context::current().trace_context,
                request_id,
            }))
            .boxed(),
    ]
}

/// What a message looks like for comparison: its debug form without the context, whose
/// deadline is relative on the wire and so differs after a round trip.
fn shape(message: &Incoming) -> String {
    match message {
        ClientMessage::Request(request) => format!("request {} {:?}", request.id, request.message),
        ClientMessage::Cancel { request_id, .. } => format!("cancel {request_id}"),
        _ => format!("{message:?}"),
    }
}

/// A change to an encoded wire, of the kinds a broken or hostile client could send.
#[derive(Debug, Clone)]
enum Mutation {
    /// One byte set to any value.
    Set(Index, u8),
    /// One bit flipped.
    Flip(Index, u8),
    /// The wire cut short.
    Truncate(Index),
    /// A few bytes removed.
    Remove(Index, usize),
    /// A few bytes inserted.
    Insert(Index, Vec<u8>),
    /// A bincode varint claiming a huge length or count (tag 252: four bytes follow, 253:
    /// eight), inserted or written over what was there.
    HugeVarint {
        at: Index,
        varint: Vec<u8>,
        overwrite: bool,
    },
    /// The first frame's length prefix replaced.
    Prefix(u32),
    /// The first frame's length prefix set to the length of what follows it, so that the
    /// body reaches the decoder whatever the other mutations did to it.
    Reframe,
    /// The wire sent twice in a row.
    Repeat,
}

fn huge_varint() -> impl Strategy<Value = Vec<u8>> {
    let big_u32 = prop_oneof![
        Just(u32::MAX),
        Just(1u32 << 31),
        (FRAME_BYTES_MAX as u32)..=u32::MAX
    ];
    let big_u64 = prop_oneof![
        Just(u64::MAX),
        Just(1u64 << 40),
        Just(1u64 << 62),
        Just(u64::from(u32::MAX) + 1),
        any::<u64>(),
    ];
    prop_oneof![
        big_u32.prop_map(|n| [&[252u8][..], &n.to_le_bytes()].concat()),
        big_u64.prop_map(|n| [&[253u8][..], &n.to_le_bytes()].concat()),
    ]
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        1 => (any::<Index>(), any::<u8>()).prop_map(|(at, byte)| Mutation::Set(at, byte)),
        1 => (any::<Index>(), 0u8..8).prop_map(|(at, bit)| Mutation::Flip(at, bit)),
        1 => any::<Index>().prop_map(Mutation::Truncate),
        1 => (any::<Index>(), 1usize..16).prop_map(|(at, len)| Mutation::Remove(at, len)),
        1 => (any::<Index>(), bytes(16)).prop_map(|(at, b)| Mutation::Insert(at, b)),
        3 => (any::<Index>(), huge_varint(), any::<bool>()).prop_map(|(at, varint, overwrite)| {
            Mutation::HugeVarint {
                at,
                varint,
                overwrite,
            }
        }),
        1 => any::<u32>().prop_map(Mutation::Prefix),
        3 => Just(Mutation::Reframe),
        1 => Just(Mutation::Repeat),
    ]
}

/// The position `at` picks in a wire of `len` bytes (`0..=len`).
fn position(at: &Index, len: usize) -> usize {
    at.index(len + 1)
}

fn mutate(mut wire: Vec<u8>, mutations: &[Mutation]) -> Vec<u8> {
    for m in mutations {
        match m {
            Mutation::Set(at, byte) if !wire.is_empty() => {
                let i = at.index(wire.len());
                wire[i] = *byte;
            }
            Mutation::Flip(at, bit) if !wire.is_empty() => {
                let i = at.index(wire.len());
                wire[i] ^= 1 << bit;
            }
            Mutation::Truncate(at) => wire.truncate(position(at, wire.len())),
            Mutation::Remove(at, len) => {
                let start = position(at, wire.len());
                let end = (start + len).min(wire.len());
                wire.drain(start..end);
            }
            Mutation::Insert(at, bytes) => {
                let i = position(at, wire.len());
                wire.splice(i..i, bytes.iter().copied());
            }
            Mutation::HugeVarint {
                at,
                varint,
                overwrite,
            } => {
                let i = position(at, wire.len());
                let end = if *overwrite {
                    (i + varint.len()).min(wire.len())
                } else {
                    i
                };
                wire.splice(i..end, varint.iter().copied());
            }
            Mutation::Prefix(len) if wire.len() >= 4 => {
                wire[..4].copy_from_slice(&len.to_be_bytes());
            }
            Mutation::Reframe if wire.len() >= 4 => {
                let body = u32::try_from(wire.len() - 4).unwrap_or(u32::MAX);
                wire[..4].copy_from_slice(&body.to_be_bytes());
            }
            Mutation::Repeat => wire = wire.repeat(2),
            _ => {}
        }
    }
    wire
}

/// The body of a request frame up to its request's tag: what every request starts with.
fn request_head() -> Vec<u8> {
    let wire = encode(
        vec![ClientMessage::Request(tarpc::Request {
            context: tarpc::context::current(),
            id: 7,
            message: ClientApiRequest::ClusterStatus {},
        })],
        FRAME_BYTES_MAX,
    );
    // The length prefix, then the head, then the tag of a request without arguments.
    wire[4..wire.len() - 1].to_vec()
}

/// `body` behind a length prefix that says its length, as the codec frames it.
fn frame(body: &[u8]) -> Vec<u8> {
    let len = u32::try_from(body.len()).expect("test bodies are small");
    [&len.to_be_bytes()[..], body].concat()
}

#[test]
fn valid_requests_decode_to_what_was_sent() {
    fuzz(
        "valid requests",
        prop::collection::vec(message(), 1..4),
        |sent, tally| {
            let wire: Vec<u8> = sent.iter().flat_map(|s| s.wire.iter().copied()).collect();
            let decoded = decode_checked(wire, tally)?;
            prop_assert_eq!(decoded.error.as_deref(), None);
            prop_assert_eq!(decoded.frames, sent.len());
            let first = decoded.first.as_ref().map(shape);
            prop_assert_eq!(first.as_ref(), Some(&sent[0].shape));
            Ok(())
        },
    );
}

#[test]
fn mutated_requests_decode_or_fail_within_bounds() {
    fuzz(
        "mutated requests",
        (
            prop::collection::vec(message(), 1..3),
            prop::collection::vec(mutation(), 1..6),
        ),
        |(sent, mutations), tally| {
            let wire: Vec<u8> = sent.iter().flat_map(|s| s.wire.iter().copied()).collect();
            let wire = mutate(wire, &mutations);
            decode_checked(wire, tally)?;
            Ok(())
        },
    );
}

#[test]
fn arbitrary_bytes_decode_or_fail_within_bounds() {
    let wire = prop_oneof![
        // Mostly refused on the length prefix alone.
        bytes(512),
        // A well-framed body of noise, which the decoder itself must refuse.
        bytes(4096).prop_map(|body| frame(&body)),
        // The start of a real request (message tag, context, request id), a request tag of
        // any kind, then noise.
        (0u8..24, bytes(2048)).prop_map(|(tag, noise)| {
            let mut body = request_head();
            body.push(tag);
            body.extend(noise);
            frame(&body)
        }),
    ];
    fuzz("arbitrary bytes", wire, |wire, tally| {
        decode_checked(wire, tally)?;
        Ok(())
    });
}

/// The most heap a decode may hold when the first frame claims more than the bound: the
/// claim is refused on its prefix, before the frame is buffered, so what is held is the
/// codec's read and write buffers (8 KiB each to start with) and a little more, well below
/// the frame that was claimed.
const REFUSED_FRAME_HEAP_BYTES_MAX: usize = FRAME_BYTES_MAX / 2;

#[test]
fn frames_over_the_bound_are_refused_before_they_are_buffered() {
    let wire = prop_oneof![
        // A claim past the bound, then a little of something.
        ((FRAME_BYTES_MAX as u32 + 1)..=u32::MAX, bytes(64)).prop_map(|(len, rest)| [
            &len.to_be_bytes()[..],
            &rest
        ]
        .concat()),
        // A real request that is too large: a payload past the bound.
        (invoke_request(), FRAME_BYTES_MAX..2 * FRAME_BYTES_MAX).prop_map(|(mut req, len)| {
            req.payload = vec![7; len];
            encode(
                vec![ClientMessage::Request(tarpc::Request {
                    context: tarpc::context::current(),
                    id: 1,
                    message: ClientApiRequest::Invoke { req },
                })],
                4 * FRAME_BYTES_MAX,
            )
        }),
    ];
    fuzz("frames over the bound", wire, |wire, tally| {
        let claimed = u32::from_be_bytes(wire[..4].try_into().expect("four bytes"));
        let what = format!("a frame claiming {claimed} bytes ({} sent)", wire.len());
        let decoded = check_case(tally, &what, REFUSED_FRAME_HEAP_BYTES_MAX, move || {
            decode(&wire, FRAME_BYTES_MAX)
        })?;
        prop_assert!(
            decoded.frames == 0 && decoded.error.is_some(),
            "{} must be refused: {:?}",
            what,
            decoded
        );
        Ok(())
    });
}

/// A request whose deadline is further away than the clock can count (`u64::MAX` seconds):
/// tarpc turns the relative deadline on the wire into an `Instant` by adding it to now, so
/// the decoder must not let that addition panic. An error or a request are both fine.
#[test]
fn a_deadline_beyond_the_clock_does_not_panic_the_decoder() {
    let mut wire = encode(
        vec![ClientMessage::Request(tarpc::Request {
            context: tarpc::context::current(),
            id: 7,
            message: ClientApiRequest::ClusterStatus {},
        })],
        FRAME_BYTES_MAX,
    );
    // After the length prefix: the message's tag (0, a request), then the deadline's
    // seconds, a one-byte varint for a deadline seconds away.
    assert_eq!(wire[4], 0, "a request");
    assert!(wire[5] < 251, "a one-byte count of seconds: {wire:?}");
    wire.splice(5..6, [&[253u8][..], &u64::MAX.to_le_bytes()].concat());
    let wire = mutate(wire, &[Mutation::Reframe]);
    let decoded = on_own_thread(move || decode(&wire, FRAME_BYTES_MAX));
    assert!(
        decoded.is_ok(),
        "decoding a deadline of u64::MAX seconds: {}",
        decoded.err().unwrap_or_default()
    );
}

/// Requests that take the most memory for their size on the wire: as many of the smallest
/// elements of a sequence as one frame holds (empty strings, commands of five bytes).
fn densest_requests(frame_bytes_max: usize) -> Vec<(&'static str, Vec<u8>)> {
    let room = frame_bytes_max - 64;
    let message = |message| {
        ClientMessage::Request(tarpc::Request {
            context: tarpc::context::current(),
            id: 1,
            message,
        })
    };
    let delete = ClientCommand {
        request_id: RequestId { client: 0, seq: 0 },
        command: Command::KvDelete {
            key: String::new(),
            expect_version: None,
        },
    };
    let mut spec = parse_manifest(MANIFEST_STAGED, &manifest_dir(), None)
        .expect("the staged manifest parses")
        .spec;
    spec.stages.truncate(1);
    let mut entry_spec = spec.clone();
    entry_spec.stages.clear();
    entry_spec.entry = vec![String::new(); room - 400];
    let invoke = |tokens| InvokeRequest {
        request_id: RequestId { client: 0, seq: 0 },
        function: String::new(),
        version: None,
        payload: Vec::new(),
        wait: false,
        idempotency_key: None,
        tokens,
        files: Vec::new(),
    };
    let requests = vec![
        (
            "commands of five bytes",
            ClientApiRequest::Write {
                // At most `COMMANDS_PER_ENTRY_MAX`: more are refused while decoding.
                commands: vec![delete; (room / 5).min(skiff_proto::model::COMMANDS_PER_ENTRY_MAX)]
                    .into(),
            },
        ),
        (
            "empty strings in a spec",
            ClientApiRequest::Write {
                commands: vec![ClientCommand {
                    request_id: RequestId { client: 0, seq: 0 },
                    command: Command::FnDeploy {
                        spec: Box::new(entry_spec),
                    },
                }]
                .into(),
            },
        ),
        (
            "empty token pairs",
            ClientApiRequest::Invoke {
                req: invoke(vec![(String::new(), String::new()); room / 2]),
            },
        ),
        (
            "cluster members",
            ClientApiRequest::ClusterInit {
                members: (0..room as u64 / 6)
                    .map(|id| (id + 300, String::new()))
                    .collect(),
                admin_token: String::new(),
            },
        ),
    ];
    requests
        .into_iter()
        .map(|(what, request)| (what, encode(vec![message(request)], frame_bytes_max)))
        .collect()
}

#[test]
fn the_densest_requests_stay_within_the_bound() {
    for (what, wire) in densest_requests(FRAME_BYTES_MAX) {
        let len = wire.len();
        let (decoded, peak_bytes) = on_own_thread(move || decode(&wire, FRAME_BYTES_MAX))
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(decoded.frames, 1, "{what}: {decoded:?}");
        eprintln!(
            "{what}: a frame of {len} bytes held {peak_bytes} bytes of heap ({:.1} times)",
            peak_bytes as f64 / len as f64
        );
        assert!(
            peak_bytes <= DECODE_HEAP_BYTES_MAX,
            "{what}: a frame of {len} bytes held {peak_bytes} bytes of heap; the bound is \
             {DECODE_HEAP_BYTES_MAX}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// Manifests, archives and settings
// ---------------------------------------------------------------------------------------

const MANIFEST_PLAIN: &str = r#"
name = "resize"
code = "src"
entry = "python3 main.py --fast"
mode = "serve"
tier = "untrusted"
memory = "256M"
timeout = "10s"
min_warm = 2
max_concurrency = 10
queue_max = 50
max_attempts = 5
retry_backoff = "500ms"
data_read = ["images/"]
data_write = ["thumbs/"]
idempotent = true
deps = ["kv:config/*", "file:/code/model.bin"]
idempotency_ttl = "2h"
policy = "policy.toml"

[env]
LEVEL = "debug"
"#;

const MANIFEST_STAGED: &str = r#"
name = "ingest"
code = "."
tier = "trusted"
timeout = "5s"

[[stage]]
name = "parse"
entry = "python3 parse.py"
tier = "untrusted"

[[stage]]
name = "store"
entry = ["/bin/sh", "store.sh"]
data_write = ["scores/"]
env = { TOKEN = "t" }
"#;

const MANIFEST_EXAMPLE: &str = include_str!("../../examples/stages/skiff.toml");

/// The directory manifests are parsed against: it holds the policy files they name
/// (`policy.toml`, and the example's), so that mutations also reach policy parsing.
fn manifest_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fuzz-manifests");
    std::fs::create_dir_all(&dir).expect("create the manifest directory");
    let policies = [
        ("policy.toml", "timeout_ms = 1000\n"),
        (
            "parse-policy.toml",
            include_str!("../../examples/stages/parse-policy.toml"),
        ),
    ];
    for (name, policy) in policies {
        // Written aside and renamed: other tests (threads, or processes under nextest) may
        // be reading the file, and must never see it half written.
        let aside = dir.join(format!(
            "{name}.{}.{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::write(&aside, policy).expect("write a policy");
        std::fs::rename(&aside, dir.join(name)).expect("put a policy in place");
    }
    dir
}

/// The most heap parsing a manifest may hold at once: the TOML document tree takes many
/// times the text it comes from (a value of two bytes is an item of a few hundred with its
/// span and decoration), then the manifest and the spec; a policy file read along the way is
/// at most its 64 KiB bound.
fn manifest_heap_bytes_max(text_bytes: usize) -> usize {
    512 * text_bytes + (1 << 20)
}

/// Parses `text` on a thread of its own and checks that it ended, did not panic, stayed
/// within its heap bound, and answered `Ok` or a one-line `Err`.
fn parse_checked(text: String, dir: &Path, tally: &Tally) -> Result<(), TestCaseError> {
    let what = format!("parsing a manifest of {} bytes", text.len());
    let bound = manifest_heap_bytes_max(text.len());
    let dir = dir.to_path_buf();
    let parsed = check_case(tally, &what, bound, move || {
        heap::measured(|| parse_manifest(&text, &dir, None).map(|_| ()))
    })?;
    if let Err(e) = parsed {
        prop_assert!(
            !e.is_empty() && !e.contains('\n'),
            "a refusal is one line: {e:?}"
        );
    }
    Ok(())
}

/// Pieces of TOML and of manifests, for texts that get past the first character.
const FRAGMENTS: &[&str] = &[
    "\n",
    " ",
    "=",
    "\"",
    "'",
    "'''",
    "\"\"\"",
    "[",
    "]",
    "[[",
    "]]",
    "{",
    "}",
    ",",
    ".",
    "#",
    "\\",
    "\\u",
    "\\U0010FFFF",
    "\\uD800",
    "0x",
    "1e999",
    "-",
    "+inf",
    "nan",
    "1979-05-27T07:32:00Z",
    "true",
    "name",
    "code",
    "entry",
    "stage",
    "[[stage]]\n",
    "[env]\n",
    "tier",
    "mode",
    "memory",
    "timeout",
    "policy",
    "data_read",
    "data_write",
    "deps",
    "idempotent",
    "min_warm",
    "max_attempts",
    "retry_backoff",
    "\"untrusted\"",
    "\"trusted\"",
    "\"serve\"",
    "\"128M\"",
    "\"30s\"",
    "99999999999999999999",
    "-1",
    "\"policy.toml\"",
    "\"kv:a*\"",
    "\"file:/x\"",
    "é",
    "\u{0}",
    "\u{feff}",
    "\r\n",
];

/// Ways to damage manifest text, applied on character boundaries.
#[derive(Debug, Clone)]
enum Edit {
    Remove(Index, usize),
    Insert(Index, &'static str),
    Replace(Index, char),
    DuplicateLine(Index),
    DropLine(Index),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        1 => (any::<Index>(), 1usize..12).prop_map(|(at, n)| Edit::Remove(at, n)),
        3 => (any::<Index>(), prop::sample::select(FRAGMENTS))
            .prop_map(|(at, f)| Edit::Insert(at, f)),
        1 => (any::<Index>(), any::<char>()).prop_map(|(at, c)| Edit::Replace(at, c)),
        1 => any::<Index>().prop_map(Edit::DuplicateLine),
        1 => any::<Index>().prop_map(Edit::DropLine),
    ]
}

fn apply_edits(text: &str, edits: &[Edit]) -> String {
    let mut chars: Vec<char> = text.chars().collect();
    for e in edits {
        match e {
            Edit::Remove(at, n) => {
                let start = position(at, chars.len());
                let end = (start + n).min(chars.len());
                chars.drain(start..end);
            }
            Edit::Insert(at, fragment) => {
                let i = position(at, chars.len());
                chars.splice(i..i, fragment.chars());
            }
            Edit::Replace(at, c) if !chars.is_empty() => {
                let i = at.index(chars.len());
                chars[i] = *c;
            }
            Edit::DuplicateLine(at) | Edit::DropLine(at) => {
                let text: String = chars.iter().collect();
                let mut lines: Vec<&str> = text.split('\n').collect();
                let i = at.index(lines.len());
                if matches!(e, Edit::DuplicateLine(_)) {
                    let line = lines[i];
                    lines.insert(i, line);
                } else {
                    lines.remove(i);
                }
                chars = lines.join("\n").chars().collect();
            }
            _ => {}
        }
    }
    chars.into_iter().collect()
}

#[test]
fn arbitrary_manifests_parse_or_fail_within_bounds() {
    let dir = manifest_dir();
    let text = prop_oneof![
        ".{0,256}",
        "[ -~\n\t]{0,512}",
        prop::collection::vec(prop::sample::select(FRAGMENTS), 0..96).prop_map(|f| f.concat()),
    ];
    fuzz("arbitrary manifests", text, |text, tally| {
        parse_checked(text, &dir, tally)
    });
}

#[test]
fn mutated_manifests_parse_or_fail_within_bounds() {
    let dir = manifest_dir();
    let text = (
        prop::sample::select(vec![MANIFEST_PLAIN, MANIFEST_STAGED, MANIFEST_EXAMPLE]),
        prop::collection::vec(edit(), 0..8),
    )
        .prop_map(|(base, edits)| apply_edits(base, &edits));
    fuzz("mutated manifests", text, |text, tally| {
        parse_checked(text, &dir, tally)
    });
}

/// Manifests with one field far too large or too deep, up to the manifest bound.
fn oversize_manifest() -> impl Strategy<Value = String> {
    let limit = MANIFEST_BYTES_MAX as usize;
    let head = "code = \".\"\nentry = \"run\"\n";
    prop_oneof![
        (1..limit).prop_map(move |n| format!("{head}name = \"{}\"\n", "n".repeat(n))),
        (1..limit / 8).prop_map(|n| format!(
            "name = \"f\"\ncode = \".\"\nentry = [{}]\n",
            vec!["\"a\""; n].join(",")
        )),
        (1..limit / 16).prop_map(move |n| {
            let vars: String = (0..n).map(|i| format!("V{i} = \"x\"\n")).collect();
            format!("name = \"f\"\n{head}[env]\n{vars}")
        }),
        (1..limit / 40).prop_map(|n| {
            let stages: String = (0..n)
                .map(|i| format!("[[stage]]\nname = \"s{i}\"\nentry = \"run\"\n"))
                .collect();
            format!("name = \"f\"\ncode = \".\"\n{stages}")
        }),
        (1..limit / 2).prop_map(move |depth| format!(
            "name = \"f\"\ncode = \".\"\nentry = {}{}\n",
            "[".repeat(depth),
            "]".repeat(depth)
        )),
        (1..limit / 8).prop_map(move |depth| format!(
            "name = \"f\"\n{head}env = {}{}\n",
            "{ a = ".repeat(depth),
            "}".repeat(depth)
        )),
        (1..limit / 2).prop_map(move |depth| format!(
            "name = \"f\"\n{head}{} = 1\n",
            vec!["a"; depth].join(".")
        )),
        (1..limit / 8).prop_map(move |n| format!(
            "name = \"f\"\n{head}data_read = [{}]\n",
            vec!["\"p/\""; n].join(",")
        )),
        (1..limit).prop_map(move |n| format!(
            "name = \"f\"\n{head}memory = \"{}M\"\ntimeout = \"{}s\"\n",
            "9".repeat(n / 2),
            "9".repeat(n / 2)
        )),
    ]
}

#[test]
fn oversize_manifests_parse_or_fail_within_bounds() {
    let dir = manifest_dir();
    fuzz("oversize manifests", oversize_manifest(), |text, tally| {
        parse_checked(text, &dir, tally)
    });
}

/// Runs a cheap parser on its own thread and checks that it ended and held little heap.
fn bounded_parse<T: Send + 'static>(
    what: &str,
    input: String,
    parse: fn(&str) -> T,
    tally: &Tally,
) -> Result<T, TestCaseError> {
    // The input copied into the answer or an error message, a few times.
    let bound = 8 * input.len() + 4096;
    let what = format!("{what} of {} bytes", input.len());
    check_case(tally, &what, bound, move || {
        heap::measured(|| parse(&input))
    })
}

#[test]
fn sizes_parse_or_fail_within_bounds() {
    let units = prop::sample::select(vec![
        ("", 1u64),
        ("b", 1),
        ("K", 1 << 10),
        ("Ki", 1 << 10),
        ("kib", 1 << 10),
        ("M", 1 << 20),
        ("mi", 1 << 20),
        ("MiB", 1 << 20),
        ("G", 1 << 30),
        ("gi", 1 << 30),
        ("GiB", 1 << 30),
    ]);
    let input = prop_oneof![
        ".{0,32}".prop_map(|s| (s, None)),
        "[0-9]{0,30}[kKmMgGiIbB]{0,4}".prop_map(|s| (s, None)),
        (any::<u64>(), units).prop_map(|(n, (unit, multiplier))| {
            (format!(" {n}{unit} "), Some(n.checked_mul(multiplier)))
        }),
    ];
    fuzz("sizes", input, |(text, expected), tally| {
        let parsed = bounded_parse("parse_size", text.clone(), parse_size, tally)?;
        if let Some(expected) = expected {
            prop_assert_eq!(parsed.ok(), expected, "{:?}", text);
        }
        Ok(())
    });
}

#[test]
fn durations_parse_or_fail_within_bounds() {
    let input = prop_oneof![
        ".{0,32}".prop_map(|s| (s, None)),
        "([0-9]{1,24}[a-z]{0,8} ?){0,6}".prop_map(|s| (s, None)),
        (0u64..1 << 40).prop_map(|n| (format!("{n}ms"), Some(n))),
        (0u64..1 << 30).prop_map(|n| (format!("{n}s"), Some(n * 1000))),
    ];
    fuzz("durations", input, |(text, expected), tally| {
        let parsed = bounded_parse("parse_duration_ms", text.clone(), parse_duration_ms, tally)?;
        if let Some(expected) = expected {
            prop_assert_eq!(parsed, Ok(expected), "{:?}", text);
        }
        Ok(())
    });
}

#[test]
fn env_vars_and_entries_parse_within_bounds() {
    let input = prop_oneof![
        ".{0,64}".prop_map(|s| (s, None)),
        ("[^=]{1,16}", ".{0,32}").prop_map(|(k, v)| (format!("{k}={v}"), Some((k, v)))),
    ];
    fuzz("env vars and entries", input, |(text, expected), tally| {
        let parsed = bounded_parse("parse_env", text.clone(), parse_env, tally)?;
        match (parsed, expected) {
            (parsed, Some(expected)) => prop_assert_eq!(parsed, Ok(expected)),
            (Err(e), None) => prop_assert!(!e.is_empty()),
            (Ok((name, _)), None) => prop_assert!(!name.is_empty() && !name.contains('=')),
        }
        let words = bounded_parse("split_entry", text.clone(), split_entry, tally)?;
        prop_assert!(words
            .iter()
            .all(|w| !w.is_empty() && !w.contains(char::is_whitespace)));
        prop_assert_eq!(words.concat(), text.split_whitespace().collect::<String>());
        Ok(())
    });
}

/// A tar archive of a few regular files and directories.
fn archive() -> impl Strategy<Value = Vec<u8>> {
    let entry = ("[a-z]{1,12}(/[a-z]{1,12}){0,3}", bytes(1500), any::<bool>());
    prop::collection::vec(entry, 1..5).prop_map(|entries| {
        let mut builder = tar::Builder::new(Vec::new());
        for (path, content, is_dir) in entries {
            let mut header = tar::Header::new_gnu();
            header.set_mode(0o755);
            header.set_mtime(0);
            if is_dir {
                header.set_entry_type(tar::EntryType::Directory);
                header.set_size(0);
                builder
                    .append_data(&mut header, &path, std::io::empty())
                    .expect("append a directory");
            } else {
                header.set_size(content.len() as u64);
                builder
                    .append_data(&mut header, &path, content.as_slice())
                    .expect("append a file");
            }
        }
        builder.into_inner().expect("finish the archive")
    })
}

/// Ways to damage an archive. Those that touch a header fix its checksum afterwards, so that
/// the reader takes the damaged header at its word.
#[derive(Debug, Clone)]
enum ArchiveEdit {
    Bytes(Mutation),
    /// A header's size field set to a huge octal number.
    HugeSize(Index),
    /// A header's entry type set to any byte (long names, PAX headers, links, sparse files).
    EntryType(Index, u8),
}

fn archive_edit() -> impl Strategy<Value = ArchiveEdit> {
    prop_oneof![
        mutation().prop_map(ArchiveEdit::Bytes),
        any::<Index>().prop_map(ArchiveEdit::HugeSize),
        (
            any::<Index>(),
            prop_oneof![prop::sample::select(b"0125LKxgS7".to_vec()), any::<u8>()]
        )
            .prop_map(|(at, kind)| ArchiveEdit::EntryType(at, kind)),
    ]
}

fn edit_archive(mut archive: Vec<u8>, edits: &[ArchiveEdit]) -> Vec<u8> {
    const BLOCK: usize = 512;
    for e in edits {
        let blocks = archive.len() / BLOCK;
        match e {
            ArchiveEdit::Bytes(m) => archive = mutate(archive, std::slice::from_ref(m)),
            ArchiveEdit::HugeSize(at) | ArchiveEdit::EntryType(at, _) if blocks > 0 => {
                let start = at.index(blocks) * BLOCK;
                let block = &mut archive[start..start + BLOCK];
                match e {
                    ArchiveEdit::HugeSize(_) => block[124..136].copy_from_slice(b"77777777777\0"),
                    ArchiveEdit::EntryType(_, kind) => block[156] = *kind,
                    ArchiveEdit::Bytes(_) => {}
                }
                // The checksum: the header's bytes summed with its own field as spaces.
                block[148..156].fill(b' ');
                let sum: u32 = block.iter().map(|&b| u32::from(b)).sum();
                block[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
            }
            _ => {}
        }
    }
    archive
}

#[test]
fn archives_are_checked_within_bounds() {
    let input = prop_oneof![
        bytes(4096),
        (archive(), prop::collection::vec(archive_edit(), 0..5))
            .prop_map(|(archive, edits)| edit_archive(archive, &edits)),
        (".{1,16}", bytes(600)).prop_map(|(name, content)| {
            single_file_archive(&name, &content).unwrap_or_default()
        }),
    ];
    fuzz("archives", input, |archive, tally| {
        // The reader copies at most an entry's long name or PAX data, which it reads from
        // the archive (preallocating at most 128 KiB), and error messages.
        let bound = 4 * archive.len() + (256 << 10);
        let what = format!("checking an archive of {} bytes", archive.len());
        let checked = check_case(tally, &what, bound, move || {
            heap::measured(|| check_archive(&archive))
        })?;
        if let Err(e) = checked {
            prop_assert!(!e.is_empty());
        }
        Ok(())
    });
}

// ---------------------------------------------------------------------------------------
// The harness itself
// ---------------------------------------------------------------------------------------

#[test]
fn the_meter_counts_what_a_case_holds_and_a_hang_is_reported() {
    let (held, peak_bytes) = on_own_thread(|| heap::measured(|| vec![1u8; 1 << 20]))
        .expect("an allocation is no failure");
    assert_eq!(held.len(), 1 << 20);
    assert!(
        (1 << 20..(1 << 20) + 4096).contains(&peak_bytes),
        "a 1 MiB vector counts as 1 MiB: {peak_bytes}"
    );
    // Freed memory counts no more, but the peak remembers it.
    let ((), peak_bytes) = heap::measured(|| drop(vec![1u8; 1 << 16]));
    assert!(peak_bytes >= 1 << 16, "{peak_bytes}");

    let panicked = on_own_thread(|| panic!("on purpose")).expect_err("a panic is reported");
    assert!(panicked.contains("on purpose"), "{panicked}");
    let hung = on_own_thread_within(Duration::from_millis(50), || {
        std::thread::sleep(Duration::from_secs(2))
    })
    .expect_err("a case past its time is reported");
    assert!(hung.contains("did not finish"), "{hung}");
}
