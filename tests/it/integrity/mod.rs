//! Issue #16's integrity part: the damage model on both backends (`db`),
//! the scrub's reads of packed frames and its periodic pass (`scrub`),
//! and damage found by the scrub or a download, withdrawn, then healed by
//! pushes through both protocols, end to end (`heal`); an 8 GiB NAR from
//! push to GC (`heavy`).

mod db;
mod heal;
mod heavy;
mod scrub;
