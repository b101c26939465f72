//! The job engine on the hashes scope: end to end, idempotence, claim plan,
//! wake-ups, scheduling, rescue, cancel/resume, drain, retention, and several real
//! daemons with SIGKILL and SIGSTOP (fencing).

mod jobs;
mod maintenance;
mod processes;
mod queue;
