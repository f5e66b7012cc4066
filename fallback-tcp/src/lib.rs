//! The TCP backend of replog's transport traits.
//!
//! Not built yet (see the service-over-TCP issue). This crate is empty on purpose and
//! claims no feature.
