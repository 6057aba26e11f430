//! A hostile tenant against a real server and real storage: one test per
//! attack of issue #12, each asserting the defended outcome, so that a
//! defence that breaks fails here.
//!
//! Every attacker holds a valid push token for its own cache only; the
//! victim is another tenant on the same server.

mod disclose;
mod door;
mod http;
mod quota;
mod reads;
