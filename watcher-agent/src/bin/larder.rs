//! The `larder` command-line client.

fn main() -> std::process::ExitCode {
    eprintln!("larder: not built yet (issue #6)");
    std::process::ExitCode::from(2)
}
