//! replog: the replicated log service.
