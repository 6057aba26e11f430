//! Issue #16's integrity part: the damage model on both backends (`db`).

mod db;
