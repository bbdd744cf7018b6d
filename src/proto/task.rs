//! How a task travels: a plain `fn(A) -> R` is sent as two code offsets (a
//! trampoline monomorphised for `A` and `R`, and the function itself),
//! measured from one anchor function of this crate. Offsets, unlike raw
//! addresses, agree between a process and any fork of it, and between
//! separate executions of the same binary (address randomisation moves the
//! whole image, not its parts).
//!
//! But only within one ELF object: an offset from the anchor names the same
//! code in the object the anchor lives in, and nothing in a shared library
//! or plugin, which another process may load elsewhere or not at all. So
//! where a task runs in another image (`StartMethod::ForkServer`, MPI), a
//! function outside that object is refused at submission
//! (`backend::local::start::check_task`, a range check against the
//! object's `PT_LOAD` segments, computed once). Under `StartMethod::Fork`
//! any plain `fn` still is a task.
//!
//! A [`Task`] (a value with state of its own) travels as one offset, of a
//! trampoline monomorphised for its type: `func` holds the same offset,
//! and nothing calls it (the trampoline calls `T::run` itself). Its state
//! travels as bytes: for one task, with the argument as one value, the
//! tuple `(task, arg)`; for a chunk, as a first item before the chunk's
//! items (encoded once per map, decoded once per chunk).

use crate::proto::codec;
use crate::proto::shared_buf::{self, Mode, Region, Supply};
use crate::proto::shm::{Block, Spill, Target};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::any::Any;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicU64, Ordering};

/// A task that carries state of its own: the values a closure would
/// capture, in a type that serde can send. Its state travels to the
/// worker with the argument, and [`run`](Task::run) is called there.
///
/// A plain `fn(A) -> R` is a task that captures nothing ([`Pool::apply`]
/// and the rest); a `Task` is for what a closure would capture, which
/// cannot travel (a closure's environment is neither code nor serde
/// data). Give it to [`Pool::apply_task`], [`Pool::apply_task_async`],
/// [`Pool::map_task`], [`Pool::imap_task`] and their `_with` forms.
///
/// Its state is encoded with the argument for each `apply_task`, and once
/// per call for the map family (its bytes are copied into every chunk and
/// decoded once per chunk in the worker, which then calls `run` for each
/// item of the chunk). A [`SharedBuf`](crate::SharedBuf) belongs in the
/// argument, not in the state: in the map family a state that holds one
/// fails with [`Error::Encode`](crate::Error::Encode).
///
/// ```
/// use procpool::{Pool, Task};
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Serialize, Deserialize)]
/// struct Scale { unit: String, factors: Vec<f64> }
///
/// impl Task for Scale {
///     type Arg = usize;
///     type Output = String;
///     fn run(&self, i: usize) -> String {
///         format!("{} {}", self.factors[i] * 2.0, self.unit)
///     }
/// }
///
/// let pool = Pool::builder().processes(2).build()?;
/// let task = Scale { unit: "kg".into(), factors: vec![0.5, 1.5] };
/// assert_eq!(pool.apply_task(&task, 1)?, "3 kg");
/// assert_eq!(pool.map_task(&task, [0, 1])?, vec!["1 kg", "3 kg"]);
/// # Ok::<(), procpool::Error>(())
/// ```
///
/// State that cannot be serialized cannot travel, and does not compile
/// (error E0277: the trait bound `File: Serialize` is not satisfied):
///
/// ```compile_fail,E0277
/// use procpool::Task;
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Serialize, Deserialize)]
/// struct Append { log: std::fs::File }   // a file handle is not data
///
/// impl Task for Append {
///     type Arg = String;
///     type Output = ();
///     fn run(&self, _line: String) {}
/// }
/// ```
///
/// Nor does a closure, capturing or not, stand for a `Task` (error E0277,
/// "is not a procpool Task"):
///
/// ```compile_fail,E0277
/// let pool = procpool::Pool::builder().processes(1).build()?;
/// let k = 3;
/// let r = pool.apply_task(&move |x: i32| x + k, 1);
/// # Ok::<(), procpool::Error>(())
/// ```
///
/// [`Pool::apply`]: crate::Pool::apply
/// [`Pool::apply_task`]: crate::Pool::apply_task
/// [`Pool::apply_task_async`]: crate::Pool::apply_task_async
/// [`Pool::map_task`]: crate::Pool::map_task
/// [`Pool::imap_task`]: crate::Pool::imap_task
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a procpool Task",
    label = "not a Task",
    note = "a Task is a type of your own that derives Serialize and Deserialize and \
            implements procpool::Task; put what a closure would capture in its fields"
)]
pub trait Task: Serialize + DeserializeOwned + Send + 'static {
    /// What each call takes (owned and serializable, as [`Data`](crate::Data)).
    type Arg: Serialize + DeserializeOwned + Send + 'static;
    /// What each call returns (owned and serializable, as [`Data`](crate::Data)).
    type Output: Serialize + DeserializeOwned + Send + 'static;
    /// Runs the task on one argument, in a worker, with the state that
    /// travelled with it.
    fn run(&self, arg: Self::Arg) -> Self::Output;
}

/// The outcome of one task (or one item of a chunk), as a code: a DONE
/// frame's `status` byte (beside its flags), and each item's in a chunk's
/// output.
pub(crate) mod code {
    /// The body is the encoded result.
    pub(crate) const OK: u8 = 0;
    /// The task panicked; the body is the encoded message.
    pub(crate) const PANIC: u8 = 1;
    /// The result could not be encoded; the body is the encoded message.
    pub(crate) const ENCODE: u8 = 2;
    /// The argument could not be decoded; the body is the encoded message.
    pub(crate) const DECODE: u8 = 3;
    /// The task was cancelled before it started and did not run.
    pub(crate) const CANCELLED: u8 = 4;
}

/// Runs a task: decodes the input, calls the function, writes the encoded
/// output (or an encoded error message), and returns a status.
type Trampoline = fn(func: usize, io: &mut Io<'_>) -> u8;

/// A task's input and output in a worker.
pub(crate) struct Io<'a> {
    /// The input, when it came in the frame.
    pub(crate) input: &'a [u8],
    /// The input, when it came in a block (and its length).
    pub(crate) block: Option<(Block, usize)>,
    /// Whether the result may be written into the input's block.
    pub(crate) reuse: bool,
    /// Whether a large result may go to a block (else it stays in `out`).
    pub(crate) spill: bool,
    /// Where a small output goes (appended).
    pub(crate) out: &'a mut Vec<u8>,
    /// A large output: its block and length, and whether that block is the
    /// input's.
    pub(crate) spilled: Option<(Block, usize, bool)>,
    /// The `SharedBuf`s that came with the frame, and those the output
    /// sends back.
    pub(crate) shared: SharedIo,
    /// Where a chunk says which of its items runs (the worker's `item`
    /// status word: 1 + the item's place), if anywhere.
    pub(crate) item: Option<&'a AtomicU64>,
}

/// A frame's `SharedBuf`s in a worker: the files that came with it (which
/// the argument's decoding takes), and the regions that the output's
/// encoding took out of the buffers it met, to send with the result.
pub(crate) struct SharedIo {
    pub(crate) mode: Mode,
    pub(crate) supply: Supply,
    pub(crate) out: Vec<Region>,
}

impl Default for SharedIo {
    fn default() -> Self {
        SharedIo {
            mode: Mode::Fds,
            supply: Supply::default(),
            out: Vec::new(),
        }
    }
}

/// The initializer every worker runs before its first task: a task
/// function and its encoded argument.
#[derive(Clone)]
pub(crate) struct Init {
    pub(crate) f: TaskFn,
    pub(crate) arg: Vec<u8>,
}

impl std::fmt::Debug for Init {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Init")
            .field("arg_bytes", &self.arg.len())
            .finish()
    }
}

/// A task function as it travels: offsets of the trampoline and of the
/// function from the anchor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct TaskFn {
    pub(crate) tramp: u64,
    pub(crate) func: u64,
}

#[inline(never)]
fn anchor() {}

fn base() -> usize {
    anchor as fn() as usize
}

fn to_offset(addr: usize) -> u64 {
    addr.wrapping_sub(base()) as u64
}

fn from_offset(off: u64) -> usize {
    base().wrapping_add(off as usize)
}

/// The address of the anchor that offsets are measured from.
pub(crate) fn anchor_addr() -> usize {
    base()
}

/// The address an offset stands for in this process.
pub(crate) fn addr_of(off: u64) -> usize {
    from_offset(off)
}

impl TaskFn {
    /// The task that runs function `func` through trampoline `tramp`.
    fn of(tramp: Trampoline, func: usize) -> Self {
        TaskFn {
            tramp: to_offset(tramp as usize),
            func: to_offset(func),
        }
    }

    /// A task that maps one `A` to one `R`.
    pub(crate) fn single<A: DeserializeOwned, R: Serialize>(f: fn(A) -> R) -> Self {
        TaskFn::of(run_single::<A, R>, f as usize)
    }

    /// A task that maps a chunk of `A`s (each framed by `push_item`) to a
    /// chunk of `(status, R)`s.
    pub(crate) fn chunk<A: DeserializeOwned, R: Serialize>(f: fn(A) -> R) -> Self {
        TaskFn::of(run_chunk::<A, R>, f as usize)
    }

    /// A [`Task`] that maps one `T::Arg` to one `T::Output`; its input is
    /// the pair `(task, arg)`.
    pub(crate) fn of_task<T: Task>() -> Self {
        let tramp = run_task_single::<T> as Trampoline as usize;
        TaskFn::of(run_task_single::<T>, tramp)
    }

    /// A [`Task`] over a chunk: its input is the task (framed as by
    /// `push_item`), then the items.
    pub(crate) fn task_chunk<T: Task>() -> Self {
        let tramp = run_task_chunk::<T> as Trampoline as usize;
        TaskFn::of(run_task_chunk::<T>, tramp)
    }

    /// Runs the task in this process (a worker).
    ///
    /// # Safety
    /// `self` must have been made by one of `TaskFn`'s constructors
    /// in a process running this same binary (a fork of this process's
    /// image, or an exec of the same executable): the offsets are turned
    /// back into code addresses and called.
    pub(crate) unsafe fn call(self, io: &mut Io<'_>) -> u8 {
        // SAFETY: by the caller's promise, `tramp` was made by a constructor
        // from a value of type `Trampoline` in this same binary; the anchor
        // and the trampoline move together under address randomisation, so
        // base + offset is the trampoline's address here.
        let t = unsafe { std::mem::transmute::<usize, Trampoline>(from_offset(self.tramp)) };
        t(from_offset(self.func), io)
    }
}

/// The message of a panic payload: a string as it is; an error, a number,
/// a bool or a char (`std::panic::panic_any`) shown with its type; anything
/// else described.
pub(crate) fn panic_message(p: &(dyn Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        return (*s).to_string();
    }
    if let Some(s) = p.downcast_ref::<String>() {
        return s.clone();
    }
    if let Some(e) = p.downcast_ref::<Box<dyn std::error::Error + Send + Sync>>() {
        return format!("a panic with an error payload: {e}");
    }
    if let Some(e) = p.downcast_ref::<Box<dyn std::error::Error + Send>>() {
        return format!("a panic with an error payload: {e}");
    }
    if let Some(e) = p.downcast_ref::<std::io::Error>() {
        return format!("a panic with an io::Error payload: {e}");
    }
    if let Some(e) = p.downcast_ref::<crate::Error>() {
        return format!("a panic with a procpool::Error payload: {e}");
    }
    macro_rules! shown {
        ($($t:ty),*) => {$(
            if let Some(v) = p.downcast_ref::<$t>() {
                return format!("a panic with a {} payload: {v:?}", stringify!($t));
            }
        )*};
    }
    shown!(
        i8, i16, i32, i64, i128, isize, u8, u16, u32, u64, u128, usize, f32, f64, bool, char
    );
    "a panic with a payload that is neither a string nor an error (std::panic::panic_any)"
        .to_string()
}

fn put_message(out: &mut Vec<u8>, msg: &str) {
    // Encoding a str into a Vec cannot fail.
    let _ = codec::encode_into(msg, out);
}

/// Decodes an error message written by `put_message`.
pub(crate) fn take_message(bytes: &[u8]) -> String {
    codec::decode_untrusted::<String>(bytes)
        .map(|(s, _)| s)
        .unwrap_or_else(|e| format!("(an undecodable message: {e})"))
}

/// Runs one task (or item): `f` calls the task's code through a
/// `__procpool_begin_task` marker (see `traceback.rs`).
fn run_one<A, R>(f: impl FnOnce(A) -> R, io: &mut Io<'_>) -> u8
where
    A: DeserializeOwned,
    R: Serialize,
{
    let start = io.out.len();
    let shared_mark = shared_buf::encoded_len();
    let outcome = catch_unwind(AssertUnwindSafe(|| {
        let decoded = {
            let input = match &io.block {
                Some((b, n)) => b.bytes(*n),
                None => io.input,
            };
            shared_buf::decode_armed(|| codec::decode::<A>(input))
        };
        let a = match decoded {
            Ok((a, _)) => a,
            Err(e) => return (code::DECODE, e.to_string()),
        };
        crate::deadline::item_starting();
        let r = f(a);
        if !io.spill {
            // Items of a chunk: straight into the frame, no block.
            let out = &mut *io.out;
            let encoded = shared_buf::encode_armed(|| codec::encode_into(&r, out));
            return match encoded {
                Ok(()) => (code::OK, String::new()),
                Err(e) => (code::ENCODE, e.to_string()),
            };
        }
        let had_block = io.block.is_some();
        let reuse = if io.reuse {
            io.block.take().map(|(b, _)| b)
        } else {
            None
        };
        let mut w = Spill::new(io.out, Target::Reuse(reuse));
        let encoded = shared_buf::encode_armed(|| codec::encode_to(&r, &mut w));
        match encoded {
            Ok(()) => match w.finish() {
                Ok((spilled, unused)) => {
                    let same = had_block && io.reuse && unused.is_none();
                    io.spilled = spilled.map(|(b, n)| (b, n, same));
                    (code::OK, String::new())
                }
                Err(e) => (code::ENCODE, e.to_string()),
            },
            Err(e) => {
                w.discard();
                (code::ENCODE, e.to_string())
            }
        }
    }));
    match outcome {
        Ok((code::OK, _)) => code::OK,
        Ok((st, msg)) => {
            io.out.truncate(start);
            io.spilled = None;
            shared_buf::truncate_encoded(shared_mark);
            put_message(io.out, &msg);
            st
        }
        Err(p) => {
            io.out.truncate(start);
            io.spilled = None;
            shared_buf::truncate_encoded(shared_mark);
            put_message(io.out, &panic_message(&*p));
            // Where it panicked, and the stack if asked for, after the message.
            crate::proto::report::put_report(io.out);
            code::PANIC
        }
    }
}

fn func_of<A, R>(func: usize) -> fn(A) -> R {
    // SAFETY: `func` is the address of a `fn(A) -> R` (TaskFn::single/chunk
    // took it from a value of exactly that type, and pair it only with this
    // trampoline instantiated for the same A and R); fn pointers and usize
    // have the same size on every platform Rust supports.
    unsafe { std::mem::transmute_copy::<usize, fn(A) -> R>(&func) }
}

/// Runs `f` over a whole frame with the frame's `SharedBuf` encoder and
/// decoder installed (see `shared_buf::frame`).
fn with_shared<T>(io: &mut Io<'_>, f: impl FnOnce(&mut Io<'_>) -> T) -> T {
    let mut shared = std::mem::take(&mut io.shared);
    let r = shared_buf::frame(shared.mode, &mut shared.out, &mut shared.supply, || f(io));
    io.shared = shared;
    r
}

fn run_single<A, R>(func: usize, io: &mut Io<'_>) -> u8
where
    A: DeserializeOwned,
    R: Serialize,
{
    let f = func_of::<A, R>(func);
    with_shared(io, |io| {
        run_one(|a| crate::traceback::__procpool_begin_task(f, a), io)
    })
}

/// Appends one item to a chunk's input: a 4-byte length, then the encoding.
pub(crate) fn push_item<A: Serialize>(
    buf: &mut Vec<u8>,
    item: &A,
) -> Result<(), crate::error::CodecError> {
    let at = buf.len();
    buf.extend_from_slice(&[0; 4]);
    if let Err(e) = codec::encode_into(item, buf) {
        buf.truncate(at);
        return Err(e);
    }
    let n = (buf.len() - at - 4) as u32;
    buf[at..at + 4].copy_from_slice(&n.to_le_bytes());
    Ok(())
}

/// Splits a chunk's input into its items.
fn items(mut input: &[u8]) -> impl Iterator<Item = &[u8]> {
    std::iter::from_fn(move || {
        if input.len() < 4 {
            return None;
        }
        let n = u32::from_le_bytes(input[..4].try_into().unwrap()) as usize;
        let n = n.min(input.len() - 4);
        let item = &input[4..4 + n];
        input = &input[4 + n..];
        Some(item)
    })
}

/// Takes item `i` out of a chunk's input (made by [`push_item`]), its
/// items counted from byte `lead` (past a [`Task`]'s state, which leads a
/// task's chunk); returns whether it was there.
pub(crate) fn remove_item(input: &mut Vec<u8>, lead: usize, i: usize) -> bool {
    let mut at = lead;
    let mut found = None;
    for (k, item) in items(input.get(lead..).unwrap_or_default()).enumerate() {
        let end = at + 4 + item.len();
        if k == i {
            found = Some(at..end);
            break;
        }
        at = end;
    }
    found.map(|r| input.drain(r)).is_some()
}

fn run_chunk<A, R>(func: usize, io: &mut Io<'_>) -> u8
where
    A: DeserializeOwned,
    R: Serialize,
{
    let f = func_of::<A, R>(func);
    // Buffers are numbered within the whole frame: one encoder and decoder
    // for every item.
    with_shared(io, |io| {
        let input = io.input;
        run_items(|a| crate::traceback::__procpool_begin_task(f, a), input, io)
    })
}

/// As `traceback::__procpool_begin_task` (whose name a backtrace ends
/// at), for a [`Task`]'s `run`.
#[inline(never)]
fn __procpool_begin_task_run<T: Task>(task: &T, a: T::Arg) -> T::Output {
    let r = task.run(a);
    std::hint::black_box(());
    r
}

fn run_task_single<T: Task>(_func: usize, io: &mut Io<'_>) -> u8 {
    with_shared(io, |io| {
        run_one(|(t, a): (T, T::Arg)| __procpool_begin_task_run(&t, a), io)
    })
}

fn run_task_chunk<T: Task>(_func: usize, io: &mut Io<'_>) -> u8 {
    with_shared(io, |io| {
        let input = io.input;
        let (task, rest) = match split_task::<T>(input) {
            Ok(x) => x,
            Err((st, msg)) => return fail_items(items(split_first(input).1), st, &msg, io),
        };
        run_items(|a| __procpool_begin_task_run(&task, a), rest, io)
    })
}

/// A chunk's input without its first item, and that item.
fn split_first(input: &[u8]) -> (&[u8], &[u8]) {
    match items(input).next() {
        Some(first) => (first, &input[4 + first.len()..]),
        None => (&[], &[]),
    }
}

/// Decodes the task that leads a chunk's input (its panic caught); the
/// task and the items after it, or the status and message every item
/// gets instead.
fn split_task<T: Task>(input: &[u8]) -> Result<(T, &[u8]), (u8, String)> {
    if input.len() < 4 {
        return Err((code::DECODE, "a chunk without its task".into()));
    }
    let (first, rest) = split_first(input);
    match catch_unwind(AssertUnwindSafe(|| codec::decode::<T>(first))) {
        Ok(Ok((t, _))) => Ok((t, rest)),
        Ok(Err(e)) => Err((code::DECODE, format!("the task's state: {e}"))),
        Err(p) => Err((code::PANIC, panic_message(&*p))),
    }
}

/// Writes the same failure for every item of a chunk.
fn fail_items<'a>(items: impl Iterator<Item = &'a [u8]>, st: u8, msg: &str, io: &mut Io<'_>) -> u8 {
    for _ in items {
        let at = io.out.len();
        io.out.extend_from_slice(&[0; 5]);
        put_message(io.out, msg);
        let n = (io.out.len() - at - 5) as u32;
        io.out[at] = st;
        io.out[at + 1..at + 5].copy_from_slice(&n.to_le_bytes());
    }
    code::OK
}

fn run_items<A, R>(f: impl Fn(A) -> R, input: &[u8], io: &mut Io<'_>) -> u8
where
    A: DeserializeOwned,
    R: Serialize,
{
    // One Io for every item (built once: a chunk may hold many tiny items).
    // Items are small and go in the frame: no block for them.
    let mut item_io = Io {
        input: &[],
        block: None,
        reuse: false,
        spill: false,
        out: &mut *io.out,
        spilled: None,
        shared: SharedIo::default(),
        item: None,
    };
    for (i, item) in items(input).enumerate() {
        if let Some(w) = io.item {
            // Read only once this worker has ended (its parent reaped it):
            // no ordering with anything else is needed.
            w.store(i as u64 + 1, Ordering::Relaxed);
        }
        let at = item_io.out.len();
        item_io.out.extend_from_slice(&[0; 5]);
        item_io.input = item;
        let st = run_one(&f, &mut item_io);
        let out = &mut *item_io.out;
        let n = (out.len() - at - 5) as u32;
        out[at] = st;
        out[at + 1..at + 5].copy_from_slice(&n.to_le_bytes());
    }
    code::OK
}

/// Decodes the items of a chunk's output, in order: each is the task's value
/// or its own error.
pub(crate) fn decode_chunk<R: DeserializeOwned>(
    bytes: &[u8],
) -> impl Iterator<Item = Result<R, crate::Error>> {
    let mut at = 0;
    std::iter::from_fn(move || {
        let (st, body, next) = chunk_item(bytes, at)?;
        at = next;
        Some(decode_outcome(st, body))
    })
}

/// The item of a chunk's output that starts at `at`: its status, its body,
/// and where the next one starts.
pub(crate) fn chunk_item(bytes: &[u8], at: usize) -> Option<(u8, &[u8], usize)> {
    let rest = bytes.get(at..).filter(|r| r.len() >= 5)?;
    let n = u32::from_le_bytes(rest[1..5].try_into().unwrap()) as usize;
    let n = n.min(rest.len() - 5);
    Some((rest[0], &rest[5..5 + n], at + 5 + n))
}

/// Whether every item of a chunk's output succeeded.
pub(crate) fn chunk_all_ok(mut bytes: &[u8]) -> bool {
    while bytes.len() >= 5 {
        if bytes[0] != code::OK {
            return false;
        }
        let n = u32::from_le_bytes(bytes[1..5].try_into().unwrap()) as usize;
        bytes = &bytes[(5 + n).min(bytes.len())..];
    }
    true
}

/// Decodes one task's output given its status.
pub(crate) fn decode_outcome<R: DeserializeOwned>(st: u8, body: &[u8]) -> Result<R, crate::Error> {
    if st == code::OK {
        codec::decode_untrusted::<R>(body)
            .map(|(r, _)| r)
            .map_err(|e| crate::Error::Decode {
                what: "result",
                source: e,
            })
    } else {
        Err(outcome_error(st, body))
    }
}

/// The error that a non-OK status with its body stands for.
pub(crate) fn outcome_error(st: u8, body: &[u8]) -> crate::Error {
    if st != code::PANIC {
        return status_error(st, take_message(body));
    }
    let (message, used) = match codec::decode_untrusted::<String>(body) {
        Ok(m) => m,
        Err(e) => (format!("(an undecodable message: {e})"), body.len()),
    };
    let (location, backtrace) = crate::proto::report::read_report(&body[used..]);
    crate::Error::TaskPanicked {
        message,
        location,
        backtrace,
        last_words: None,
    }
}

/// The message of an initializer that failed: its panic's message, and
/// where it panicked.
pub(crate) fn init_failure_message(st: u8, body: &[u8]) -> String {
    if st != code::PANIC {
        return take_message(body);
    }
    match outcome_error(st, body) {
        crate::Error::TaskPanicked {
            message,
            location: Some(l),
            ..
        } => format!("{message} (at {l})"),
        crate::Error::TaskPanicked { message, .. } => message,
        e => e.to_string(),
    }
}

/// The error that a non-OK status with its message stands for.
pub(crate) fn status_error(st: u8, message: String) -> crate::Error {
    use crate::error::CodecError;
    match st {
        code::PANIC => crate::Error::TaskPanicked {
            message,
            location: None,
            backtrace: None,
            last_words: None,
        },
        code::ENCODE => crate::Error::Encode {
            what: "result",
            source: CodecError::new(message),
        },
        code::DECODE => crate::Error::Decode {
            what: "argument",
            source: CodecError::new(message),
        },
        code::CANCELLED => crate::Error::Cancelled,
        _ => crate::Error::Broken {
            reason: format!("a worker sent an unknown status {st}: {message}"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn double(x: u64) -> u64 {
        x * 2
    }

    fn fails(x: u64) -> u64 {
        assert!(x < 10, "too big: {x}");
        x
    }

    fn encoded<T: Serialize>(v: &T) -> Vec<u8> {
        let mut out = Vec::new();
        codec::encode_into(v, &mut out).unwrap();
        out
    }

    /// Runs `f` on `input` here, as a worker does; its status and output.
    fn run(f: TaskFn, input: &[u8]) -> (u8, Vec<u8>) {
        let mut out = Vec::new();
        let mut io = Io {
            input,
            block: None,
            reuse: false,
            spill: false,
            out: &mut out,
            spilled: None,
            shared: SharedIo::default(),
            item: None,
        };
        // SAFETY: made by TaskFn::single/chunk in this very process.
        let st = unsafe { f.call(&mut io) };
        (st, out)
    }

    #[test]
    fn an_offset_stands_for_the_same_address() {
        let f = double as fn(u64) -> u64 as usize;
        assert_eq!(addr_of(to_offset(f)), f);
        assert_eq!(addr_of(0), anchor_addr());
    }

    #[test]
    fn a_task_runs_from_its_offsets() {
        let (st, out) = run(TaskFn::single(double), &encoded(&21u64));
        assert_eq!(decode_outcome::<u64>(st, &out).unwrap(), 42);
        // An argument cut short does not decode.
        let (st, out) = run(TaskFn::single(double), &[]);
        assert_eq!(st, code::DECODE);
        assert!(matches!(
            decode_outcome::<u64>(st, &out),
            Err(crate::Error::Decode {
                what: "argument",
                ..
            })
        ));
    }

    #[test]
    fn a_panic_becomes_its_message() {
        let (st, out) = run(TaskFn::single(fails), &encoded(&12u64));
        assert_eq!(st, code::PANIC);
        match outcome_error(st, &out) {
            crate::Error::TaskPanicked { message, .. } => assert_eq!(message, "too big: 12"),
            e => panic!("not a panic: {e:?}"),
        }
        assert!(init_failure_message(st, &out).starts_with("too big: 12"));
    }

    #[test]
    fn a_chunk_carries_each_items_own_outcome() {
        let mut input = Vec::new();
        for x in [1u64, 11, 3] {
            push_item(&mut input, &x).unwrap();
        }
        assert_eq!(items(&input).count(), 3);
        let (st, out) = run(TaskFn::chunk(fails), &input);
        assert_eq!(st, code::OK);
        assert!(!chunk_all_ok(&out));
        let got: Vec<Result<u64, crate::Error>> = decode_chunk(&out).collect();
        assert_eq!(got.len(), 3);
        assert_eq!(got[0].as_ref().unwrap(), &1);
        assert!(matches!(got[1], Err(crate::Error::TaskPanicked { .. })));
        assert_eq!(got[2].as_ref().unwrap(), &3);
        let (_, out) = run(TaskFn::chunk(double), &input);
        assert!(chunk_all_ok(&out));
    }

    #[derive(serde::Serialize, serde::Deserialize)]
    struct Scale {
        by: u64,
        unit: String,
    }

    impl Task for Scale {
        type Arg = u64;
        type Output = String;
        fn run(&self, x: u64) -> String {
            assert!(x < 10, "too big: {x}");
            format!("{} {}", x * self.by, self.unit)
        }
    }

    #[test]
    fn a_task_runs_with_the_state_that_came_with_its_argument() {
        let t = Scale {
            by: 3,
            unit: "m".into(),
        };
        let (st, out) = run(TaskFn::of_task::<Scale>(), &encoded(&(&t, &7u64)));
        assert_eq!(decode_outcome::<String>(st, &out).unwrap(), "21 m");
        let (st, _) = run(TaskFn::of_task::<Scale>(), &encoded(&(&t, &70u64)));
        assert_eq!(st, code::PANIC);
    }

    #[test]
    fn a_task_chunk_decodes_its_state_once_for_every_item() {
        let t = Scale {
            by: 2,
            unit: "s".into(),
        };
        let mut input = Vec::new();
        push_item(&mut input, &t).unwrap();
        for x in [1u64, 11, 4] {
            push_item(&mut input, &x).unwrap();
        }
        let (st, out) = run(TaskFn::task_chunk::<Scale>(), &input);
        assert_eq!(st, code::OK);
        let got: Vec<Result<String, crate::Error>> = decode_chunk(&out).collect();
        assert_eq!(got.len(), 3);
        assert_eq!(got[0].as_ref().unwrap(), "2 s");
        assert!(matches!(got[1], Err(crate::Error::TaskPanicked { .. })));
        assert_eq!(got[2].as_ref().unwrap(), "8 s");
    }

    #[test]
    fn a_task_state_that_does_not_decode_fails_every_item_of_its_chunk() {
        let mut input = Vec::new();
        push_item(&mut input, &7u8).unwrap(); // not a Scale
        for x in [1u64, 2] {
            push_item(&mut input, &x).unwrap();
        }
        let (st, out) = run(TaskFn::task_chunk::<Scale>(), &input);
        assert_eq!(st, code::OK);
        let got: Vec<Result<String, crate::Error>> = decode_chunk(&out).collect();
        assert_eq!(got.len(), 2);
        for r in got {
            match r {
                Err(crate::Error::Decode { what, source }) => {
                    assert_eq!(what, "argument");
                    assert!(source.to_string().contains("the task's state"), "{source}");
                }
                other => panic!("not a decode error: {other:?}"),
            }
        }
        // A chunk cut before its task: nothing to run.
        let (st, out) = run(TaskFn::task_chunk::<Scale>(), &[1, 0]);
        assert_eq!(st, code::OK);
        assert_eq!(decode_chunk::<String>(&out).count(), 0);
    }

    #[test]
    fn a_chunk_says_which_item_runs_and_an_item_can_be_taken_out() {
        let mut input = Vec::new();
        for x in [1u64, 2, 3] {
            push_item(&mut input, &x).unwrap();
        }
        let word = AtomicU64::new(0);
        let mut out = Vec::new();
        let mut io = Io {
            input: &input,
            block: None,
            reuse: false,
            spill: false,
            out: &mut out,
            spilled: None,
            shared: SharedIo::default(),
            item: Some(&word),
        };
        // SAFETY: made by TaskFn::chunk in this very process.
        let st = unsafe { TaskFn::chunk(double).call(&mut io) };
        assert_eq!(st, code::OK);
        // The last item to start was the third.
        assert_eq!(word.load(Ordering::SeqCst), 3);
        assert!(remove_item(&mut input, 0, 1));
        assert!(!remove_item(&mut input, 0, 2));
        let left: Vec<u64> = items(&input)
            .map(|b| codec::decode::<u64>(b).unwrap().0)
            .collect();
        assert_eq!(left, [1, 3]);
    }

    #[test]
    fn a_task_chunk_counts_its_items_after_its_state() {
        let t = Scale {
            by: 3,
            unit: "m".into(),
        };
        let mut input = Vec::new();
        push_item(&mut input, &t).unwrap();
        let lead = input.len();
        for x in [1u64, 2, 3, 4] {
            push_item(&mut input, &x).unwrap();
        }
        let word = AtomicU64::new(0);
        let mut out = Vec::new();
        let mut io = Io {
            input: &input,
            block: None,
            reuse: false,
            spill: false,
            out: &mut out,
            spilled: None,
            shared: SharedIo::default(),
            item: Some(&word),
        };
        // SAFETY: made by TaskFn::task_chunk in this very process.
        let st = unsafe { TaskFn::task_chunk::<Scale>().call(&mut io) };
        assert_eq!(st, code::OK);
        // Four items after the state: the word says the fourth, not the fifth.
        assert_eq!(word.load(Ordering::SeqCst), 4);
        // Item 0 is the first after the state; the state stays in front.
        assert!(remove_item(&mut input, lead, 0));
        assert!(!remove_item(&mut input, lead, 3));
        let (st, out) = run(TaskFn::task_chunk::<Scale>(), &input);
        assert_eq!(st, code::OK);
        let got: Vec<String> = decode_chunk(&out).map(|r| r.unwrap()).collect();
        assert_eq!(got, ["6 m", "9 m", "12 m"]);
    }

    #[test]
    fn an_items_length_past_the_end_is_cut_to_what_is_there() {
        let mut input = Vec::new();
        push_item(&mut input, &5u64).unwrap();
        input[..4].copy_from_slice(&1000u32.to_le_bytes());
        let all: Vec<&[u8]> = items(&input).collect();
        assert_eq!(all, [&input[4..]]);
        // Fewer than 4 bytes: no item.
        assert_eq!(items(&[1, 0]).count(), 0);
    }

    #[test]
    fn each_status_stands_for_its_error() {
        let e = |st| status_error(st, "why".into());
        assert!(matches!(e(code::CANCELLED), crate::Error::Cancelled));
        assert!(matches!(
            e(code::ENCODE),
            crate::Error::Encode { what: "result", .. }
        ));
        assert!(matches!(
            e(code::DECODE),
            crate::Error::Decode {
                what: "argument",
                ..
            }
        ));
        assert!(matches!(e(code::PANIC), crate::Error::TaskPanicked { .. }));
        match e(77) {
            crate::Error::Broken { reason } => assert!(reason.contains("unknown status 77")),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_panic_payload_is_described_by_its_type() {
        let msg = |p: Box<dyn Any + Send>| panic_message(&*p);
        assert_eq!(msg(Box::new("plain")), "plain");
        assert_eq!(msg(Box::new(String::from("owned"))), "owned");
        assert_eq!(msg(Box::new(7i32)), "a panic with a i32 payload: 7");
        assert!(msg(Box::new(vec![1u8])).contains("neither a string nor an error"));
    }

    #[test]
    fn an_undecodable_message_says_so() {
        assert_eq!(take_message(&encoded(&"fine")), "fine");
        assert!(take_message(&[0xff]).starts_with("(an undecodable message"));
    }
}
