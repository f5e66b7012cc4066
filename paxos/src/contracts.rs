//! Code contracts: preconditions, postconditions and invariants.
//!
//! With the cargo feature `contracts` (on in every test and in the simulator) each
//! contract is checked and a violation panics with its message; without it, the
//! conditions are type-checked but never evaluated, so release builds pay nothing.

/// A precondition of a handler: what must hold when it is called.
macro_rules! require {
    ($cond:expr, $($arg:tt)+) => {
        if cfg!(feature = "contracts") && !($cond) {
            panic!("contract violated: precondition `{}`: {}", stringify!($cond), format_args!($($arg)+));
        }
    };
    ($cond:expr) => {
        if cfg!(feature = "contracts") && !($cond) {
            panic!("contract violated: precondition `{}`", stringify!($cond));
        }
    };
}

/// A postcondition of a handler: what it guarantees when it returns.
macro_rules! ensure {
    ($cond:expr, $($arg:tt)+) => {
        if cfg!(feature = "contracts") && !($cond) {
            panic!("contract violated: postcondition `{}`: {}", stringify!($cond), format_args!($($arg)+));
        }
    };
    ($cond:expr) => {
        if cfg!(feature = "contracts") && !($cond) {
            panic!("contract violated: postcondition `{}`", stringify!($cond));
        }
    };
}

/// An invariant: what holds between any two handler calls.
macro_rules! invariant {
    ($cond:expr, $($arg:tt)+) => {
        if cfg!(feature = "contracts") && !($cond) {
            panic!("contract violated: invariant `{}`: {}", stringify!($cond), format_args!($($arg)+));
        }
    };
    ($cond:expr) => {
        if cfg!(feature = "contracts") && !($cond) {
            panic!("contract violated: invariant `{}`", stringify!($cond));
        }
    };
}

pub(crate) use {ensure, invariant, require};

/// Whether contracts are checked in this build.
pub const ENABLED: bool = cfg!(feature = "contracts");
