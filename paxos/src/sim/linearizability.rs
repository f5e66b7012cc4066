//! A linearizability checker for client histories, with a model of the replicated log.
//!
//! # What it checks
//!
//! A *history* is the list of operations clients issued against the system, each with
//! the (virtual) time it was called, the time it returned and what it returned. The
//! history is *linearizable* if every operation can be given a single instant between
//! its call and its return at which it takes effect, such that the operations, run one
//! after the other in that order against the sequential specification (a [`Model`]),
//! produce exactly the outputs the clients saw.
//!
//! # Algorithm
//!
//! [`check`] is the Wing & Gong depth-first search with Lowe's memoization, as described
//! in G. Lowe, *Testing for linearizability*, Concurrency and Computation: Practice and
//! Experience 29(4), 2017, and used by Knossos and Porcupine:
//!
//! * every operation becomes a call event and a return event; the events are put, in
//!   time order, into a doubly-linked list;
//! * the search walks the list from its head. The calls before the first return are the
//!   operations that may take effect next. Linearizing one runs it through the model,
//!   pushes it onto a stack and *lifts* its call and return out of the list (dancing
//!   links), then the walk restarts from the head. Reaching a return means that
//!   operation should already have taken effect: the search backtracks (pops the last
//!   linearized operation, puts its events back, restores the model state) and tries
//!   the next candidate after it;
//! * a cache of every configuration already explored, *(set of linearized operations
//!   as a bitset, model state)*, prunes the search: two paths that linearized the same
//!   operations and reached the same state have the same future, so the second one is
//!   cut. This is what makes the search practical (Lowe's improvement over Wing & Gong).
//!
//! The search succeeds as soon as every operation that returned is linearized. It is
//! bounded by a `budget` of steps (one step is one visit of a list entry) and answers
//! [`CheckResult::Unknown`] when the budget runs out.
//!
//! No partitioning is done (a single log is one object, it cannot be split).
//!
//! # Operations that never returned
//!
//! An [`Operation`] with `ret: None` and `output: None` never returned: its client
//! crashed or gave up. It may have taken effect at any instant after its call, or never.
//! Its return is treated as being at infinity (it never forces the search to backtrack),
//! it may be left out of the linearization entirely, and when it is linearized any
//! output is accepted: [`Model::step_unknown`] gives the states it may lead to.
//!
//! Such operations are the expensive part of a check, since each can go almost
//! anywhere. At each configuration the search tries the operations that returned first,
//! then those that never returned, most recently called first. Two optional, sound
//! pruning rules help further, and [`LogModel`] opts into both:
//! [`Model::PENDING_ONLY_WHEN_STUCK`] and [`Model::expired`].
//!
//! # Cost
//!
//! With few operations that never returned, a check is close to linear: a history of
//! 1,000 to 2,000 operations with 8 to 10 clients takes milliseconds in a test build.
//! The search is exponential in the worst case, and for the log the hard case is many
//! *appends that never returned*: each gap in the returned positions may be filled by
//! any of them, and a wrong choice is only caught by the next read covering it. Many
//! such appends (tens of percent of the operations) with sparse reads can exhaust the
//! budget, above all when the history is not linearizable and the search must be
//! exhaustive. The answer is then [`CheckResult::Unknown`], never a wrong verdict.
//!
//! # Time and ties
//!
//! Operation `a` *precedes* operation `b` in real time, and so must be linearized before
//! it, if and only if `a` returned **strictly before** `b` was called: `a.ret < b.call`.
//! If `a.ret == b.call` the two are treated as **concurrent** and may be linearized in
//! either order. (In the list, at equal times, call events come before return events.)
//! Virtual time is coarse, and an event delivered "at the same instant" as another has
//! no reliable order, so ties are resolved in the lenient direction: the checker never
//! reports a violation that depends on the order of two simultaneous events. This
//! applies to two operations of the same client too (the `client` field is only used in
//! explanations). An operation with `call == ret` is allowed.
//!
//! # The replicated log
//!
//! [`LogModel`] is the specification of replog's client interface: `Append { value }`
//! returns the 1-based position of the new entry, `Read` returns the length and the
//! [`log_digest`] of the whole committed log. Values are assumed unique in a history.
//! The model state is only `(length, running digest)`, which is exact up to 64-bit hash
//! collisions.
//!
//! ```ignore
//! use paxos::sim::linearizability::{check, log_digest, CheckResult, LogInput, LogModel, LogOutput, Operation};
//!
//! let history = vec![
//!     Operation { client: 1, call: 0, ret: Some(10), input: LogInput::Append { value: 7 },
//!                 output: Some(LogOutput::Appended { position: 1 }) },
//!     Operation { client: 2, call: 5, ret: Some(20), input: LogInput::Read,
//!                 output: Some(LogOutput::Read { len: 1, digest: log_digest(&[7]) }) },
//! ];
//! let result = check::<LogModel>(&history, 1_000_000);
//! assert!(result.is_linearizable(), "{result}");
//! ```

use std::collections::HashMap;
use std::fmt::{self, Debug, Write as _};
use std::hash::{BuildHasherDefault, Hash, Hasher};

// ---------------------------------------------------------------------------------------
// Public API
// ---------------------------------------------------------------------------------------

/// A sequential specification: the object as if operations ran one at a time.
///
/// Implementations are types without data (the methods are associated functions); the
/// checker is generic over them.
pub trait Model {
    /// The object's state. Hashed and compared to memoize the search, so keep it small.
    type State: Clone + Eq + Hash + Debug;
    /// An operation's input (what the client asked for).
    type Input: Debug;
    /// An operation's output (what the client got back).
    type Output: Debug;

    /// Opt-in pruning for operations that never returned.
    ///
    /// If `true`, the search linearizes an operation that never returned only when none
    /// of the returned operations that may go next can take effect in the current state.
    /// Setting it is sound only if the model guarantees: *whenever a returned operation
    /// `c` can take effect in a state `s` (`step(s, c)` is `Some`), it can no longer take
    /// effect in any state reachable from any state of `step_unknown(s, x)`*, for every
    /// operation `x`. That holds for monotone objects whose every output pins the state,
    /// such as an append-only log whose appends return positions and whose reads return
    /// the length. The default, `false`, is always sound.
    const PENDING_ONLY_WHEN_STUCK: bool = false;

    /// The initial state.
    fn init() -> Self::State;

    /// Runs `input` in `state`: the next state if the specification allows `output`,
    /// `None` if it does not.
    fn step(state: &Self::State, input: &Self::Input, output: &Self::Output) -> Option<Self::State>;

    /// Runs `input`, whose output is unknown (the operation never returned), in `state`:
    /// every state it may lead to, for any output.
    ///
    /// Outcomes that leave the state unchanged may be omitted: an operation that never
    /// returned may also never be linearized, which has the same effect. So a read-only
    /// operation can return an empty vector.
    fn step_unknown(state: &Self::State, input: &Self::Input) -> Vec<Self::State>;

    /// Whether the operation `input` that returned `output` can no longer take effect,
    /// neither in `state` nor in any state reachable from it. Optional pruning: a
    /// configuration in which an operation that must still be linearized has expired is
    /// abandoned at once. Return `true` only when certain; the default never prunes.
    fn expired(state: &Self::State, input: &Self::Input, output: &Self::Output) -> bool {
        let _ = (state, input, output);
        false
    }
}

/// One client operation in a history.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Operation<I, O> {
    /// The client that issued it (used only in explanations).
    pub client: u64,
    /// When it was called (virtual nanoseconds).
    pub call: u64,
    /// When it returned, or `None` if it never did. Must be `>= call`.
    pub ret: Option<u64>,
    /// What was asked.
    pub input: I,
    /// What was returned, or `None` if it never returned. Must be `None` exactly when
    /// `ret` is `None`.
    pub output: Option<O>,
}

/// The verdict of [`check`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CheckResult {
    /// The history is linearizable.
    Linearizable,
    /// The history is not linearizable (or is ill-formed, see [`check`]).
    NotLinearizable {
        /// A multi-line, human-readable account: the operation that could not be placed,
        /// the model state, the candidates that were refused and the longest linearizable
        /// prefix found. Print it with `{}` (for example through the `Display` impl of
        /// [`CheckResult`]), not `{:?}`.
        explanation: String,
    },
    /// The search ran out of budget before reaching a verdict.
    Unknown,
}

impl CheckResult {
    /// Whether this is [`CheckResult::Linearizable`].
    pub fn is_linearizable(&self) -> bool {
        matches!(self, CheckResult::Linearizable)
    }

    /// Whether this is [`CheckResult::NotLinearizable`].
    pub fn is_not_linearizable(&self) -> bool {
        matches!(self, CheckResult::NotLinearizable { .. })
    }
}

impl fmt::Display for CheckResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CheckResult::Linearizable => f.write_str("linearizable"),
            CheckResult::NotLinearizable { explanation } => f.write_str(explanation),
            CheckResult::Unknown => f.write_str("unknown: the search exceeded its step budget"),
        }
    }
}

/// Checks `history` for linearizability against the model `M`.
///
/// The order of `history` does not matter; operations are named by their index in it
/// (`#i`) in explanations. `budget` bounds the search in steps (one step visits one
/// event of the list; a linearizable history of `n` operations usually needs a small
/// multiple of `n` steps); past it the answer is [`CheckResult::Unknown`].
///
/// An ill-formed history (`ret < call`, or exactly one of `ret` and `output` is `None`)
/// is reported as [`CheckResult::NotLinearizable`] with an explanation starting with
/// `ill-formed history`.
///
/// See the [module docs](self) for the algorithm and the rule for equal times.
pub fn check<M: Model>(history: &[Operation<M::Input, M::Output>], budget: u64) -> CheckResult {
    if let Some(explanation) = ill_formed(history) {
        return CheckResult::NotLinearizable { explanation };
    }
    let mut search = Search::<M>::new(history);
    match search.run(budget) {
        Outcome::Linearizable => CheckResult::Linearizable,
        Outcome::Unknown => CheckResult::Unknown,
        Outcome::NotLinearizable => CheckResult::NotLinearizable { explanation: search.explain() },
    }
}

// ---------------------------------------------------------------------------------------
// The replicated log
// ---------------------------------------------------------------------------------------

/// What a client asks of the log.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LogInput {
    /// Append `value` (values are unique within a history).
    Append {
        /// The value appended.
        value: u64,
    },
    /// Read the whole committed log.
    Read,
}

/// What the log answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LogOutput {
    /// The append took effect as entry `position`.
    Appended {
        /// The 1-based index of the new entry in the log.
        position: u64,
    },
    /// The committed log, summarized.
    Read {
        /// The number of entries.
        len: u64,
        /// [`log_digest`] of the entries' values, in log order.
        digest: u64,
    },
}

/// [`LogModel`]'s state: the log's length and the running [`log_digest`] of its values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LogState {
    /// The number of entries.
    pub len: u64,
    /// The digest of the entries so far.
    pub digest: u64,
}

/// The sequential specification of the replicated append-only log.
///
/// * `Append { value }` in a log of length `n` must return `Appended { position: n + 1 }`
///   and makes the log `n + 1` long;
/// * `Read` must return `Read { len, digest }` equal to the log's length and digest.
///
/// An append that never returned may have taken effect; a read that never returned has
/// no effect, so it is never linearized. This model sets
/// [`Model::PENDING_ONLY_WHEN_STUCK`]: once an append takes effect the length only grows,
/// and every returned operation pins the length at which it takes effect.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LogModel;

impl Model for LogModel {
    type State = LogState;
    type Input = LogInput;
    type Output = LogOutput;

    const PENDING_ONLY_WHEN_STUCK: bool = true;

    fn init() -> LogState {
        LogState { len: 0, digest: DIGEST_EMPTY }
    }

    fn step(state: &LogState, input: &LogInput, output: &LogOutput) -> Option<LogState> {
        match (input, output) {
            (LogInput::Append { value }, LogOutput::Appended { position }) if *position == state.len + 1 => {
                Some(LogState { len: state.len + 1, digest: digest_extend(state.digest, *value) })
            }
            (LogInput::Read, LogOutput::Read { len, digest }) if *len == state.len && *digest == state.digest => {
                Some(*state)
            }
            _ => None,
        }
    }

    fn step_unknown(state: &LogState, input: &LogInput) -> Vec<LogState> {
        match input {
            LogInput::Append { value } => {
                vec![LogState { len: state.len + 1, digest: digest_extend(state.digest, *value) }]
            }
            // A read has no effect: never linearizing it is equivalent.
            LogInput::Read => Vec::new(),
        }
    }

    /// The log only grows, so an append whose position is at most the length, or a read
    /// of a shorter log or of a different log of the same length, can no longer take
    /// effect.
    fn expired(state: &LogState, _input: &LogInput, output: &LogOutput) -> bool {
        match output {
            LogOutput::Appended { position } => *position <= state.len,
            LogOutput::Read { len, digest } => *len < state.len || (*len == state.len && *digest != state.digest),
        }
    }
}

/// The digest of the empty log (the FNV-1a 64-bit offset basis).
pub const DIGEST_EMPTY: u64 = 0xcbf2_9ce4_8422_2325;

/// The FNV-1a 64-bit prime.
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// Extends the digest `d` of a log with one more entry, `value`: FNV-1a over the eight
/// little-endian bytes of `value`. Order-sensitive.
pub const fn digest_extend(d: u64, value: u64) -> u64 {
    let bytes = value.to_le_bytes();
    let mut h = d;
    let mut i = 0;
    while i < bytes.len() {
        h ^= bytes[i] as u64;
        h = h.wrapping_mul(FNV_PRIME);
        i += 1;
    }
    h
}

/// The digest of a log holding `values`, in order: [`digest_extend`] folded from
/// [`DIGEST_EMPTY`] (so it is FNV-1a 64 over the concatenated little-endian values).
pub fn log_digest(values: &[u64]) -> u64 {
    values.iter().fold(DIGEST_EMPTY, |d, &value| digest_extend(d, value))
}

// ---------------------------------------------------------------------------------------
// The search
// ---------------------------------------------------------------------------------------

/// The list's head sentinel (node 0).
const HEAD: usize = 0;
/// "No node".
const NIL: usize = usize::MAX;

/// Returns why `history` is ill-formed, if it is.
fn ill_formed<I: Debug, O: Debug>(history: &[Operation<I, O>]) -> Option<String> {
    for (i, op) in history.iter().enumerate() {
        match (op.ret, &op.output) {
            (Some(ret), Some(_)) if ret < op.call => {
                return Some(format!(
                    "ill-formed history: op #{i} returns (t={ret}) before it is called (t={}): {}",
                    op.call,
                    describe(i, op)
                ));
            }
            (Some(_), None) | (None, Some(_)) => {
                return Some(format!(
                    "ill-formed history: op #{i} has a return time or an output but not both: \
                     client {}, t={}..{:?}, {:?} -> {:?}",
                    op.client, op.call, op.ret, op.input, op.output
                ));
            }
            _ => {}
        }
    }
    None
}

/// One line describing operation `i`.
fn describe<I: Debug, O: Debug>(i: usize, op: &Operation<I, O>) -> String {
    match (op.ret, &op.output) {
        (Some(ret), Some(out)) => {
            format!("#{i} (client {}, t={}..{ret}): {:?} -> {:?}", op.client, op.call, op.input, out)
        }
        _ => format!("#{i} (client {}, t={}..never): {:?} -> (no response)", op.client, op.call, op.input),
    }
}

/// How a search ended.
enum Outcome {
    Linearizable,
    NotLinearizable,
    Unknown,
}

/// One linearized operation on the search stack.
struct Frame<S> {
    /// Its call node.
    node: usize,
    /// The model state before it.
    prev_state: S,
    /// Further states it may lead to, not tried yet (operations that never returned).
    alternatives: Vec<S>,
    /// The call nodes of the other operations that never returned and may go next in
    /// the configuration below this frame, not tried yet.
    choices: Vec<usize>,
}

/// Why the search had to backtrack.
#[derive(Clone, Copy, PartialEq, Eq)]
enum DeadEnd {
    /// The search reached the return of an operation it had not linearized.
    Blocked,
    /// An operation still to be linearized can no longer take effect.
    Expired,
}

/// The deepest point the search reached, for the explanation.
struct Deepest<S> {
    /// The linearized operations, in order.
    prefix: Vec<usize>,
    /// The operation that could not be placed.
    blocked: usize,
    /// Why.
    kind: DeadEnd,
    /// The operations that could have gone next, all refused by the model.
    candidates: Vec<usize>,
    /// The model state after `prefix`.
    state: S,
}

struct Search<'h, M: Model> {
    history: &'h [Operation<M::Input, M::Output>],
    // The event list. Node 0 is the head sentinel; nodes 1.. are events in time order.
    next: Vec<usize>,
    prev: Vec<usize>,
    /// The operation of each node.
    op_of: Vec<usize>,
    /// For a call node: its return node, or `NIL` if the operation never returned.
    /// For a return node (and the head): `NIL`.
    ret_of: Vec<usize>,
    is_call: Vec<bool>,
    // The current configuration.
    state: M::State,
    linearized: Vec<u64>,
    linearized_hash: u64,
    /// A random 64-bit word per operation; `linearized_hash` is the xor of the words of
    /// the linearized operations.
    op_hash: Vec<u64>,
    stack: Vec<Frame<M::State>>,
    /// Returned operations not linearized yet: the search succeeds when this is zero.
    remaining: usize,
    cache: Cache<M::State>,
    deepest: Option<Deepest<M::State>>,
}

impl<'h, M: Model> Search<'h, M> {
    fn new(history: &'h [Operation<M::Input, M::Output>]) -> Self {
        let n = history.len();
        // (time, 0 = call / 1 = return, op): calls before returns at equal times.
        let mut events: Vec<(u64, u8, usize)> = Vec::with_capacity(2 * n);
        for (i, op) in history.iter().enumerate() {
            events.push((op.call, 0, i));
            if let (Some(ret), Some(_)) = (op.ret, &op.output) {
                events.push((ret, 1, i));
            }
        }
        events.sort_unstable();

        let nodes = events.len() + 1;
        let mut next = Vec::with_capacity(nodes);
        let mut prev = Vec::with_capacity(nodes);
        let mut op_of = Vec::with_capacity(nodes);
        let mut ret_of = vec![NIL; nodes];
        let mut is_call = Vec::with_capacity(nodes);
        let mut call_node = vec![NIL; n];
        // The head sentinel.
        next.push(if events.is_empty() { NIL } else { 1 });
        prev.push(NIL);
        op_of.push(NIL);
        is_call.push(false);
        for (k, &(_, kind, op)) in events.iter().enumerate() {
            let node = k + 1;
            next.push(if node + 1 < nodes { node + 1 } else { NIL });
            prev.push(node - 1);
            op_of.push(op);
            is_call.push(kind == 0);
            if kind == 0 {
                call_node[op] = node;
            } else {
                ret_of[call_node[op]] = node;
            }
        }

        let words = n.div_ceil(64).max(1);
        let op_hash = (0..n as u64).map(|i| mix64(i.wrapping_add(1))).collect();
        let remaining = history.iter().filter(|op| op.output.is_some()).count();
        Search {
            history,
            next,
            prev,
            op_of,
            ret_of,
            is_call,
            state: M::init(),
            linearized: vec![0; words],
            linearized_hash: 0,
            op_hash,
            stack: Vec::new(),
            remaining,
            cache: Cache::new(words),
            deepest: None,
        }
    }

    fn run(&mut self, budget: u64) -> Outcome {
        let mut steps: u64 = 0;
        let mut entry = self.next[HEAD];
        loop {
            if self.remaining == 0 {
                return Outcome::Linearizable;
            }
            if steps >= budget {
                return Outcome::Unknown;
            }
            steps += 1;
            // Some return is still in the list (`remaining > 0`), and every walk stops at
            // the first return it meets, so the walk never runs off the end.
            debug_assert_ne!(entry, NIL);
            let next = if self.is_call[entry] {
                let op = &self.history[self.op_of[entry]];
                let state = match &op.output {
                    Some(output) => M::step(&self.state, &op.input, output),
                    // Operations that never returned are tried last, see below.
                    None => None,
                };
                if state.is_some() && self.enter(entry, state, Vec::new(), &mut Vec::new()) {
                    self.after_enter()
                } else {
                    Some(self.next[entry])
                }
            } else {
                // The walk reached the first return: every returned operation that may go
                // next has been tried. Now try those that never returned, newest first.
                let mut choices = self.pending_choices(entry);
                if self.try_choices(&mut choices) {
                    self.after_enter()
                } else {
                    // This op must have taken effect by now, and none of the candidates
                    // before it could go next.
                    self.note_dead_end(entry, DeadEnd::Blocked);
                    self.backtrack()
                }
            };
            match next {
                Some(next) => entry = next,
                None => return Outcome::NotLinearizable,
            }
        }
    }

    /// Where to go after a linearization: back to the head of the list, or, if the new
    /// configuration is a dead end (an operation expired), wherever backtracking leads.
    fn after_enter(&mut self) -> Option<usize> {
        if self.check_expired() {
            self.backtrack()
        } else {
            Some(self.next[HEAD])
        }
    }

    /// The call nodes of the operations that never returned and may go next (before
    /// `return_node`), in list order: [`Search::try_choices`] takes them from the end, so
    /// the most recently called first, as the likeliest to fill a gap. Empty if the
    /// model's [`Model::PENDING_ONLY_WHEN_STUCK`] rule excludes them.
    fn pending_choices(&self, return_node: usize) -> Vec<usize> {
        let mut choices = Vec::new();
        if M::PENDING_ONLY_WHEN_STUCK && !self.stuck() {
            return choices;
        }
        let mut node = self.next[HEAD];
        while node != return_node {
            if self.is_call[node] && self.ret_of[node] == NIL {
                choices.push(node);
            }
            node = self.next[node];
        }
        choices
    }

    /// Linearizes the last operation of `choices` that can be, in one of its outcomes,
    /// removing it and those tried before it; the rest stay on its stack frame.
    fn try_choices(&mut self, choices: &mut Vec<usize>) -> bool {
        while let Some(node) = choices.pop() {
            let op = &self.history[self.op_of[node]];
            let states = M::step_unknown(&self.state, &op.input);
            if self.enter(node, None, states, choices) {
                return true;
            }
        }
        false
    }

    /// Undoes linearizations until there is something left to try, and returns the entry
    /// to visit next; `None` if there is nothing left to undo (not linearizable).
    ///
    /// After undoing a returned operation, the walk continues with the entry after it.
    /// After undoing an operation that never returned, its next outcome is tried, then
    /// the other such operations of the same configuration; when none is left, that
    /// configuration is a dead end too.
    fn backtrack(&mut self) -> Option<usize> {
        loop {
            let mut frame = self.stack.pop()?;
            let node = frame.node;
            self.state = frame.prev_state;
            self.unlift(node);
            self.clear_bit(self.op_of[node]);
            if self.ret_of[node] != NIL {
                self.remaining += 1;
                return Some(self.next[node]);
            }
            let entered = (!frame.alternatives.is_empty()
                && self.enter(node, None, frame.alternatives, &mut frame.choices))
                || self.try_choices(&mut frame.choices);
            if entered {
                if self.check_expired() {
                    continue;
                }
                return Some(self.next[HEAD]);
            }
            let first_return = self.first_return();
            self.note_dead_end(first_return, DeadEnd::Blocked);
        }
    }

    /// The first return node in the list. There is one while `remaining > 0`.
    fn first_return(&self) -> usize {
        let mut node = self.next[HEAD];
        while node != NIL && self.is_call[node] {
            node = self.next[node];
        }
        node
    }

    /// Tries to linearize the operation of call node `entry`, leading to state `first`
    /// or else one of `alternatives`: the first of them whose configuration is not in
    /// the cache is taken. The other alternatives and the other `choices` (taken) are
    /// kept on its stack frame, for backtracking.
    fn enter(
        &mut self,
        entry: usize,
        mut first: Option<M::State>,
        mut alternatives: Vec<M::State>,
        choices: &mut Vec<usize>,
    ) -> bool {
        let op = self.op_of[entry];
        self.set_bit(op);
        loop {
            let Some(state) = first.take().or_else(|| alternatives.pop()) else {
                self.clear_bit(op);
                return false;
            };
            let key = mix64(self.linearized_hash ^ hash_state(&state));
            if self.cache.insert(key, &self.linearized, &state) {
                let prev_state = std::mem::replace(&mut self.state, state);
                self.stack.push(Frame { node: entry, prev_state, alternatives, choices: std::mem::take(choices) });
                self.lift(entry);
                if self.ret_of[entry] != NIL {
                    self.remaining -= 1;
                }
                return true;
            }
        }
    }

    /// Whether one of the returned operations that may go next has expired (see
    /// [`Model::expired`]) in the current configuration, which is then a dead end.
    fn check_expired(&mut self) -> bool {
        let mut node = self.next[HEAD];
        while node != NIL && self.is_call[node] {
            let op = &self.history[self.op_of[node]];
            if let Some(output) = &op.output {
                if M::expired(&self.state, &op.input, output) {
                    self.note_dead_end(node, DeadEnd::Expired);
                    return true;
                }
            }
            node = self.next[node];
        }
        false
    }

    /// Whether none of the returned operations that may go next (the calls before the
    /// first return in the list) can take effect in the current state.
    fn stuck(&self) -> bool {
        let mut node = self.next[HEAD];
        while node != NIL && self.is_call[node] {
            let op = &self.history[self.op_of[node]];
            if let Some(output) = &op.output {
                if M::step(&self.state, &op.input, output).is_some() {
                    return false;
                }
            }
            node = self.next[node];
        }
        true
    }

    /// Records the configuration at a dead end if it is the deepest so far. `node` is
    /// the return node of the operation that should have taken effect already
    /// ([`DeadEnd::Blocked`]), or the call node of the operation that expired.
    ///
    /// At a deepest blocked point no candidate can be linearized at all: one that could
    /// would have led deeper, or to a cached configuration of greater depth, visited
    /// before (configurations pruned as expired are recorded too).
    fn note_dead_end(&mut self, node: usize, kind: DeadEnd) {
        let depth = self.stack.len();
        if self.deepest.as_ref().is_some_and(|d| d.prefix.len() >= depth) {
            return;
        }
        let mut candidates = Vec::new();
        if kind == DeadEnd::Blocked {
            let mut c = self.next[HEAD];
            while c != node {
                if self.is_call[c] {
                    candidates.push(self.op_of[c]);
                }
                c = self.next[c];
            }
        }
        self.deepest = Some(Deepest {
            prefix: self.stack.iter().map(|f| self.op_of[f.node]).collect(),
            blocked: self.op_of[node],
            kind,
            candidates,
            state: self.state.clone(),
        });
    }

    fn explain(&self) -> String {
        const SHOWN: usize = 40;
        let Some(d) = &self.deepest else {
            return "not linearizable".to_string();
        };
        let h = self.history;
        let n = h.len();
        let completed = h.iter().filter(|op| op.output.is_some()).count();
        let blocked = &h[d.blocked];
        let mut s = String::new();
        let _ = writeln!(s, "not linearizable: op {} cannot be linearized.", describe(d.blocked, blocked));
        let _ = write!(
            s,
            "The longest linearizable prefix found places {} of the {n} ops (the history has \
             {completed} ops that returned). After it the model state is {:?}, ",
            d.prefix.len(),
            d.state,
        );
        match d.kind {
            DeadEnd::Expired => {
                let _ = writeln!(s, "in which op #{} has not taken effect and no longer can.", d.blocked);
            }
            DeadEnd::Blocked => {
                let _ = writeln!(
                    s,
                    "and op #{} must take effect before it returns at t={}, but the model \
                     refuses each of the {} ops that could go next (called by then and not \
                     yet placed):",
                    d.blocked,
                    blocked.ret.unwrap_or(u64::MAX),
                    d.candidates.len(),
                );
                for &c in d.candidates.iter().take(SHOWN) {
                    let _ = writeln!(s, "    {}", describe(c, &h[c]));
                }
                if d.candidates.len() > SHOWN {
                    let _ = writeln!(s, "    ... and {} more", d.candidates.len() - SHOWN);
                }
            }
        }
        let _ = writeln!(
            s,
            "Longest linearizable prefix, in linearization order{}:",
            if d.prefix.is_empty() { " (empty)" } else { "" }
        );
        let skip = d.prefix.len().saturating_sub(SHOWN);
        if skip > 0 {
            let _ = writeln!(s, "    ... {skip} earlier ops omitted");
        }
        for (k, &p) in d.prefix.iter().enumerate().skip(skip) {
            let _ = writeln!(s, "    {:>4}. {}", k + 1, describe(p, &h[p]));
        }
        s
    }

    // The dancing-links operations. Lifting removes a call and its return; unlifting
    // restores them, in the reverse order. A lifted node keeps its own links.

    fn lift(&mut self, call: usize) {
        self.unlink(call);
        let ret = self.ret_of[call];
        if ret != NIL {
            self.unlink(ret);
        }
    }

    fn unlift(&mut self, call: usize) {
        let ret = self.ret_of[call];
        if ret != NIL {
            self.relink(ret);
        }
        self.relink(call);
    }

    fn unlink(&mut self, node: usize) {
        let (p, n) = (self.prev[node], self.next[node]);
        self.next[p] = n;
        if n != NIL {
            self.prev[n] = p;
        }
    }

    fn relink(&mut self, node: usize) {
        let (p, n) = (self.prev[node], self.next[node]);
        self.next[p] = node;
        if n != NIL {
            self.prev[n] = node;
        }
    }

    fn set_bit(&mut self, op: usize) {
        self.linearized[op / 64] |= 1 << (op % 64);
        self.linearized_hash ^= self.op_hash[op];
    }

    fn clear_bit(&mut self, op: usize) {
        self.linearized[op / 64] &= !(1 << (op % 64));
        self.linearized_hash ^= self.op_hash[op];
    }
}

/// The set of explored configurations: (linearized set, state) pairs, chained by hash.
/// Bitsets are stored flat, `words` words each, so an insert allocates nothing but the
/// amortized growth of the vectors.
struct Cache<S> {
    /// Key hash to the newest entry with that hash.
    index: HashMap<u64, u32, BuildHasherDefault<IdentityHasher>>,
    /// Per entry: the next (older) entry with the same key hash, or `u32::MAX`.
    chain: Vec<u32>,
    states: Vec<S>,
    bits: Vec<u64>,
    words: usize,
}

impl<S: Clone + Eq> Cache<S> {
    fn new(words: usize) -> Self {
        Cache { index: HashMap::default(), chain: Vec::new(), states: Vec::new(), bits: Vec::new(), words }
    }

    /// Inserts the configuration; false if it was already there.
    fn insert(&mut self, key: u64, bits: &[u64], state: &S) -> bool {
        let w = self.words;
        let head = self.index.get(&key).copied().unwrap_or(u32::MAX);
        let mut i = head;
        while i != u32::MAX {
            let k = i as usize;
            if self.states[k] == *state && self.bits[k * w..(k + 1) * w] == *bits {
                return false;
            }
            i = self.chain[k];
        }
        let id = u32::try_from(self.states.len()).expect("linearizability cache overflow");
        self.states.push(state.clone());
        self.bits.extend_from_slice(bits);
        self.chain.push(head);
        self.index.insert(key, id);
        true
    }
}

/// A hasher for keys that are already well-mixed 64-bit hashes.
#[derive(Default)]
struct IdentityHasher(u64);

impl Hasher for IdentityHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8) | u64::from(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// A fast, non-cryptographic hasher for model states (FxHash-style).
#[derive(Default)]
struct StateHasher(u64);

impl Hasher for StateHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(word));
        }
        for &b in chunks.remainder() {
            self.write_u64(u64::from(b));
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }

    fn write_u8(&mut self, n: u8) {
        self.write_u64(u64::from(n));
    }

    fn write_u32(&mut self, n: u32) {
        self.write_u64(u64::from(n));
    }

    fn write_usize(&mut self, n: usize) {
        self.write_u64(n as u64);
    }
}

fn hash_state<S: Hash>(state: &S) -> u64 {
    let mut h = StateHasher::default();
    state.hash(&mut h);
    h.finish()
}

/// The splitmix64 finalizer: a bijective 64-bit mix.
fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    type Op = Operation<LogInput, LogOutput>;

    const BUDGET: u64 = 10_000_000;

    fn append(client: u64, call: u64, ret: u64, value: u64, position: u64) -> Op {
        Operation {
            client,
            call,
            ret: Some(ret),
            input: LogInput::Append { value },
            output: Some(LogOutput::Appended { position }),
        }
    }

    fn append_pending(client: u64, call: u64, value: u64) -> Op {
        Operation { client, call, ret: None, input: LogInput::Append { value }, output: None }
    }

    fn read(client: u64, call: u64, ret: u64, values: &[u64]) -> Op {
        Operation {
            client,
            call,
            ret: Some(ret),
            input: LogInput::Read,
            output: Some(LogOutput::Read { len: values.len() as u64, digest: log_digest(values) }),
        }
    }

    fn read_pending(client: u64, call: u64) -> Op {
        Operation { client, call, ret: None, input: LogInput::Read, output: None }
    }

    fn run(history: &[Op]) -> CheckResult {
        check::<LogModel>(history, BUDGET)
    }

    #[track_caller]
    fn assert_linearizable(history: &[Op]) {
        let result = run(history);
        assert!(result.is_linearizable(), "expected linearizable, got: {result}");
    }

    #[track_caller]
    fn assert_not_linearizable(history: &[Op]) -> String {
        match run(history) {
            CheckResult::NotLinearizable { explanation } => explanation,
            other => panic!("expected not linearizable, got: {other}"),
        }
    }

    // --- digest -------------------------------------------------------------------------

    #[test]
    fn digest_is_fnv1a_incremental_and_order_sensitive() {
        assert_eq!(log_digest(&[]), DIGEST_EMPTY);
        // FNV-1a 64 of eight zero bytes, computed bytewise.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for _ in 0..8 {
            // xor with the zero byte, then multiply by the FNV prime.
            h = h.wrapping_mul(0x100_0000_01b3);
        }
        assert_eq!(log_digest(&[0]), h);
        assert_eq!(digest_extend(log_digest(&[1, 2]), 3), log_digest(&[1, 2, 3]));
        assert_ne!(log_digest(&[1, 2]), log_digest(&[2, 1]));
        assert_ne!(log_digest(&[1]), log_digest(&[1, 1]));
    }

    // --- the cases asked for ------------------------------------------------------------

    #[test]
    fn empty_history_is_linearizable() {
        assert_linearizable(&[]);
    }

    #[test]
    fn sequential_history_passes() {
        assert_linearizable(&[
            read(1, 0, 1, &[]),
            append(1, 2, 3, 10, 1),
            append(2, 4, 5, 20, 2),
            read(2, 6, 7, &[10, 20]),
            append(1, 8, 9, 30, 3),
            read(3, 10, 11, &[10, 20, 30]),
        ]);
    }

    #[test]
    fn concurrent_appends_in_either_order_pass() {
        assert_linearizable(&[append(1, 0, 10, 1, 1), append(2, 5, 15, 2, 2)]);
        assert_linearizable(&[append(1, 0, 10, 1, 2), append(2, 5, 15, 2, 1)]);
        // A read concurrent with both may see either order, or neither append.
        for seen in [&[][..], &[1], &[2], &[1, 2]] {
            let positions = if seen == [2] { (2, 1) } else { (1, 2) };
            assert_linearizable(&[
                append(1, 0, 10, 1, positions.0),
                append(2, 0, 10, 2, positions.1),
                read(3, 0, 10, seen),
            ]);
        }
        assert_linearizable(&[append(1, 0, 10, 1, 2), append(2, 0, 10, 2, 1), read(3, 0, 10, &[2, 1])]);
    }

    #[test]
    fn read_missing_a_completed_append_fails() {
        let explanation = assert_not_linearizable(&[append(1, 0, 10, 7, 1), read(2, 11, 20, &[])]);
        assert!(explanation.contains("op #1"), "{explanation}");
        // Stale read of a longer log, too.
        assert_not_linearizable(&[append(1, 0, 10, 7, 1), append(1, 11, 12, 8, 2), read(2, 13, 20, &[7])]);
    }

    #[test]
    fn two_appends_with_the_same_position_fail() {
        assert_not_linearizable(&[append(1, 0, 10, 1, 1), append(2, 0, 10, 2, 1)]);
    }

    #[test]
    fn position_beyond_the_possible_fails() {
        assert_not_linearizable(&[append(1, 0, 10, 1, 1), append(2, 0, 10, 2, 3)]);
        assert_not_linearizable(&[read(1, 0, 10, &[]), append(2, 0, 10, 2, 3)]);
    }

    #[test]
    fn read_with_wrong_order_or_unknown_value_fails() {
        assert_not_linearizable(&[append(1, 0, 10, 1, 1), append(2, 0, 10, 2, 2), read(3, 0, 10, &[2, 1])]);
        assert_not_linearizable(&[append(1, 0, 10, 1, 1), read(3, 0, 10, &[9])]);
    }

    #[test]
    fn pending_append_needed_to_explain_a_read_passes() {
        assert_linearizable(&[append_pending(1, 0, 5), read(2, 10, 20, &[5])]);
        // It fills a gap in the positions, too.
        assert_linearizable(&[append_pending(1, 0, 5), append(2, 10, 20, 6, 2), read(3, 30, 40, &[5, 6])]);
        // But not before it was called.
        assert_not_linearizable(&[read(2, 0, 5, &[5]), append_pending(1, 10, 5)]);
    }

    #[test]
    fn pending_append_not_needed_passes() {
        assert_linearizable(&[append_pending(1, 0, 5), append(2, 10, 20, 6, 1), read(3, 30, 40, &[6])]);
        // Taking effect late, after everything else, is fine too.
        assert_linearizable(&[
            append_pending(1, 0, 5),
            append(2, 10, 20, 6, 1),
            read(3, 30, 40, &[6]),
            read(3, 50, 60, &[6, 5]),
        ]);
        // A pending read never constrains anything.
        assert_linearizable(&[read_pending(1, 0), append(2, 10, 20, 6, 1)]);
    }

    #[test]
    fn real_time_order_violation_fails() {
        // A returns before B is called, yet B got the lower position.
        let explanation = assert_not_linearizable(&[append(1, 0, 10, 1, 2), append(2, 11, 20, 2, 1)]);
        assert!(explanation.contains("op #0"), "{explanation}");
    }

    #[test]
    fn equal_return_and_call_times_are_concurrent() {
        // A returns at t=10 and B is called at t=10: concurrent, so either order.
        assert_linearizable(&[append(1, 0, 10, 1, 2), append(2, 10, 20, 2, 1)]);
        assert_linearizable(&[append(1, 0, 10, 1, 1), read(2, 10, 20, &[])]);
        // Zero-length operations are fine.
        assert_linearizable(&[append(1, 5, 5, 1, 1), read(2, 5, 5, &[1])]);
        // One nanosecond apart: ordered.
        assert_not_linearizable(&[append(1, 0, 10, 1, 2), append(2, 11, 20, 2, 1)]);
    }

    #[test]
    fn history_order_does_not_matter() {
        let mut h = vec![read(3, 30, 40, &[5, 6]), append(2, 10, 20, 6, 2), append_pending(1, 0, 5)];
        assert_linearizable(&h);
        h.reverse();
        assert_linearizable(&h);
    }

    #[test]
    fn ill_formed_histories_are_reported() {
        let e = assert_not_linearizable(&[append(1, 10, 5, 1, 1)]);
        assert!(e.starts_with("ill-formed history"), "{e}");
        let mut op = append(1, 0, 5, 1, 1);
        op.output = None;
        let e = assert_not_linearizable(&[op]);
        assert!(e.starts_with("ill-formed history"), "{e}");
    }

    #[test]
    fn budget_exhaustion_gives_unknown() {
        let h = [append(1, 0, 10, 1, 1), append(2, 0, 10, 2, 2), read(3, 20, 30, &[1, 2])];
        assert_eq!(check::<LogModel>(&h, 1), CheckResult::Unknown);
        assert!(check::<LogModel>(&h, 100).is_linearizable());
    }

    #[test]
    fn explanation_names_the_blocked_op_and_the_prefix() {
        let h = [append(1, 0, 1, 1, 1), append(1, 2, 3, 2, 2), read(2, 4, 5, &[1])];
        let e = assert_not_linearizable(&h);
        println!("{e}");
        assert!(e.contains("op #2 (client 2, t=4..5): Read"), "{e}");
        assert!(e.contains("places 2 of the 3 ops"), "{e}");
        assert!(e.contains("len: 2"), "{e}");
        assert!(e.contains("   1. #0"), "{e}");
        assert!(e.contains("   2. #1"), "{e}");
    }

    // --- a generic model with several outcomes for an unknown output ---------------------

    /// A bit that `Flip` sets to a random value it returns, and `Get` reads.
    struct Coin;

    #[derive(Debug)]
    enum CoinIn {
        Flip,
        Get,
    }

    impl Model for Coin {
        type State = bool;
        type Input = CoinIn;
        type Output = bool;

        fn init() -> bool {
            false
        }

        fn step(state: &bool, input: &CoinIn, output: &bool) -> Option<bool> {
            match input {
                CoinIn::Flip => Some(*output),
                CoinIn::Get => (output == state).then_some(*state),
            }
        }

        fn step_unknown(_: &bool, input: &CoinIn) -> Vec<bool> {
            match input {
                CoinIn::Flip => vec![false, true],
                CoinIn::Get => Vec::new(),
            }
        }
    }

    fn coin(call: u64, ret: Option<u64>, input: CoinIn, output: Option<bool>) -> Operation<CoinIn, bool> {
        Operation { client: 0, call, ret, input, output }
    }

    #[test]
    fn generic_model_with_several_unknown_outcomes() {
        for seen in [false, true] {
            // A pending flip can explain either value, in either order of alternatives.
            let h = [
                coin(0, None, CoinIn::Flip, None),
                coin(10, Some(20), CoinIn::Get, Some(true)),
                coin(30, Some(40), CoinIn::Get, Some(seen)),
            ];
            assert_eq!(check::<Coin>(&h, BUDGET).is_linearizable(), seen, "{seen}");
        }
        // false, true, false needs two flips; one pending flip is not enough.
        let h = [
            coin(0, None, CoinIn::Flip, None),
            coin(1, Some(2), CoinIn::Get, Some(false)),
            coin(3, Some(4), CoinIn::Get, Some(true)),
            coin(5, Some(6), CoinIn::Get, Some(false)),
        ];
        assert!(check::<Coin>(&h, BUDGET).is_not_linearizable());
    }

    // --- randomized -----------------------------------------------------------------------

    /// splitmix64.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }

        fn chance(&mut self, percent: u64) -> bool {
            self.below(100) < percent
        }
    }

    struct Shape {
        ops: usize,
        clients: usize,
        /// Percent of operations that never return.
        pending: u64,
        /// Percent of operations that are reads.
        reads: u64,
        /// Maximum distance from an operation's call or return to its linearization point.
        spread: u64,
    }

    /// A random linearizable history: a sequential execution of the log at strictly
    /// increasing linearization points, each operation given a random interval around its
    /// point, on a client that has no other operation outstanding. Times are small so
    /// equal times are frequent.
    fn valid_history(rng: &mut Rng, shape: &Shape) -> Vec<Op> {
        let mut log: Vec<u64> = Vec::new();
        let mut free_at = vec![0u64; shape.clients];
        let mut t = 0u64;
        let mut history = Vec::with_capacity(shape.ops);
        for i in 0..shape.ops {
            t += 1 + rng.below(2);
            let earliest = *free_at.iter().min().unwrap();
            if earliest >= t {
                t = earliest + 1;
            }
            let free: Vec<usize> = (0..shape.clients).filter(|&c| free_at[c] < t).collect();
            let c = free[rng.below(free.len() as u64) as usize];
            let call = t - rng.below((t - free_at[c]).min(shape.spread) + 1);
            let ret = t + rng.below(shape.spread + 1);
            free_at[c] = ret;
            let pending = rng.chance(shape.pending);
            let op = if rng.chance(shape.reads) {
                let output = LogOutput::Read { len: log.len() as u64, digest: log_digest(&log) };
                Operation { client: c as u64, call, ret: Some(ret), input: LogInput::Read, output: Some(output) }
            } else {
                let value = 1_000 + i as u64;
                let took_effect = !pending || rng.chance(50);
                if took_effect {
                    log.push(value);
                }
                Operation {
                    client: c as u64,
                    call,
                    ret: Some(ret),
                    input: LogInput::Append { value },
                    output: Some(LogOutput::Appended { position: log.len() as u64 }),
                }
            };
            history.push(if pending { Operation { ret: None, output: None, ..op } } else { op });
        }
        // The input order must not matter.
        for i in (1..history.len()).rev() {
            history.swap(i, rng.below(i as u64 + 1) as usize);
        }
        history
    }

    /// Changes one output so the history certainly (up to digest collisions) becomes
    /// non-linearizable: an append takes another append's position, or a read's digest
    /// changes. None if there is nothing to perturb.
    fn perturb(rng: &mut Rng, history: &mut [Op]) -> Option<usize> {
        let returned: Vec<usize> = (0..history.len()).filter(|&i| history[i].output.is_some()).collect();
        if returned.is_empty() {
            return None;
        }
        for _ in 0..100 {
            let i = returned[rng.below(returned.len() as u64) as usize];
            match history[i].output {
                Some(LogOutput::Read { len, digest }) => {
                    history[i].output = Some(if rng.chance(50) {
                        LogOutput::Read { len, digest: digest ^ 1 }
                    } else {
                        LogOutput::Read { len: len + 1, digest }
                    });
                    return Some(i);
                }
                Some(LogOutput::Appended { position }) => {
                    let j = returned[rng.below(returned.len() as u64) as usize];
                    if let Some(LogOutput::Appended { position: other }) = history[j].output {
                        if other != position {
                            history[i].output = Some(LogOutput::Appended { position: other });
                            return Some(i);
                        }
                    }
                }
                None => unreachable!(),
            }
        }
        None
    }

    #[test]
    fn random_valid_histories_pass_and_perturbed_ones_fail() {
        let mut rng = Rng(0x5eed);
        let mut perturbed = 0;
        for round in 0..300 {
            let shape = Shape {
                ops: 5 + rng.below(120) as usize,
                clients: 1 + rng.below(10) as usize,
                pending: [0, 3, 10, 25][round % 4],
                reads: 10 + rng.below(50),
                spread: 1 + rng.below(15),
            };
            let mut h = valid_history(&mut rng, &shape);
            let result = run(&h);
            assert!(result.is_linearizable(), "round {round}: {result}\n{h:#?}");
            if let Some(i) = perturb(&mut rng, &mut h) {
                perturbed += 1;
                let result = run(&h);
                assert!(result.is_not_linearizable(), "round {round}, perturbed op #{i}: {result}\n{h:#?}");
            }
        }
        assert!(perturbed > 250, "{perturbed}");
    }

    /// The log model without the pruning rule, to test the plain search.
    struct UnprunedLog;

    impl Model for UnprunedLog {
        type State = LogState;
        type Input = LogInput;
        type Output = LogOutput;

        fn init() -> LogState {
            LogModel::init()
        }

        fn step(state: &LogState, input: &LogInput, output: &LogOutput) -> Option<LogState> {
            LogModel::step(state, input, output)
        }

        fn step_unknown(state: &LogState, input: &LogInput) -> Vec<LogState> {
            LogModel::step_unknown(state, input)
        }
    }

    /// Exhaustive search over every order of every subset of the operations, with the
    /// full log as state: the definition of linearizability, for small histories.
    fn brute_force(history: &[Op]) -> bool {
        fn go(history: &[Op], placed: &mut Vec<bool>, log: &mut Vec<u64>) -> bool {
            let all_returned_placed = history.iter().zip(placed.iter()).all(|(op, &p)| p || op.output.is_none());
            if all_returned_placed {
                return true;
            }
            for x in 0..history.len() {
                if placed[x] {
                    continue;
                }
                // Every returned op that returned strictly before x was called goes first.
                let ready =
                    (0..history.len()).all(|y| placed[y] || history[y].ret.is_none_or(|ret| ret >= history[x].call));
                if !ready {
                    continue;
                }
                let op = &history[x];
                let pushed = match (op.input, op.output) {
                    (LogInput::Append { value }, Some(LogOutput::Appended { position })) => {
                        if position != log.len() as u64 + 1 {
                            continue;
                        }
                        log.push(value);
                        true
                    }
                    (LogInput::Append { value }, None) => {
                        log.push(value);
                        true
                    }
                    (LogInput::Read, Some(LogOutput::Read { len, digest })) => {
                        if len != log.len() as u64 || digest != log_digest(log) {
                            continue;
                        }
                        false
                    }
                    (LogInput::Read, None) => false,
                    _ => continue,
                };
                placed[x] = true;
                let ok = go(history, placed, log);
                placed[x] = false;
                if pushed {
                    log.pop();
                }
                if ok {
                    return true;
                }
            }
            false
        }
        go(history, &mut vec![false; history.len()], &mut Vec::new())
    }

    #[test]
    fn agrees_with_brute_force_on_small_random_histories() {
        let mut rng = Rng(42);
        let (mut yes, mut no) = (0, 0);
        for round in 0..3_000 {
            let shape = Shape {
                ops: 1 + rng.below(7) as usize,
                clients: 1 + rng.below(4) as usize,
                pending: 25,
                reads: 40,
                spread: 1 + rng.below(4),
            };
            let mut h = valid_history(&mut rng, &shape);
            // Random, often plausible, changes of outputs.
            let values: Vec<u64> = h
                .iter()
                .filter_map(|op| match op.input {
                    LogInput::Append { value } => Some(value),
                    LogInput::Read => None,
                })
                .collect();
            for _ in 0..rng.below(3) {
                let i = rng.below(h.len() as u64) as usize;
                h[i].output = match h[i].output {
                    Some(LogOutput::Appended { .. }) => {
                        Some(LogOutput::Appended { position: 1 + rng.below(h.len() as u64) })
                    }
                    Some(LogOutput::Read { .. }) => {
                        let mut seen: Vec<u64> = values.iter().copied().filter(|_| rng.chance(50)).collect();
                        if seen.len() > 1 && rng.chance(50) {
                            seen.swap(0, 1);
                        }
                        Some(LogOutput::Read { len: seen.len() as u64, digest: log_digest(&seen) })
                    }
                    None => None,
                };
            }
            let expected = brute_force(&h);
            let pruned = run(&h);
            let unpruned = check::<UnprunedLog>(&h, BUDGET);
            assert_eq!(pruned.is_linearizable(), expected, "round {round}: {pruned}\n{h:#?}");
            assert_eq!(unpruned.is_linearizable(), expected, "round {round}: {unpruned}\n{h:#?}");
            assert!(!matches!(pruned, CheckResult::Unknown));
            if expected {
                yes += 1;
            } else {
                no += 1;
            }
        }
        assert!(yes > 500 && no > 500, "yes {yes}, no {no}");
    }

    // --- performance ----------------------------------------------------------------------

    fn timed(label: &str, history: &[Op]) -> CheckResult {
        let start = std::time::Instant::now();
        let result = run(history);
        println!(
            "{label}: {} ops checked in {:?}: {}",
            history.len(),
            start.elapsed(),
            match &result {
                CheckResult::NotLinearizable { .. } => "not linearizable",
                other if other.is_linearizable() => "linearizable",
                _ => "unknown",
            }
        );
        result
    }

    #[test]
    fn performance_1000_ops_8_clients() {
        let mut rng = Rng(1_000);
        let shape = Shape { ops: 1_000, clients: 8, pending: 3, reads: 30, spread: 20 };
        let mut h = valid_history(&mut rng, &shape);
        let result = timed("1000 ops, 8 clients, valid", &h);
        assert!(result.is_linearizable(), "{result}");
        perturb(&mut rng, &mut h).unwrap();
        let result = timed("1000 ops, 8 clients, perturbed", &h);
        assert!(result.is_not_linearizable(), "{result}");
    }

    #[test]
    fn performance_2000_ops_10_clients() {
        let mut rng = Rng(2_000);
        let shape = Shape { ops: 2_000, clients: 10, pending: 5, reads: 30, spread: 30 };
        let mut h = valid_history(&mut rng, &shape);
        let result = timed("2000 ops, 10 clients, valid", &h);
        assert!(result.is_linearizable(), "{result}");
        perturb(&mut rng, &mut h).unwrap();
        let result = timed("2000 ops, 10 clients, perturbed", &h);
        assert!(result.is_not_linearizable(), "{result}");
    }
}
