//! The static check of `compose.yaml` (there is no Docker engine here):
//! the services exist; the Larder services are built from the repo's
//! Dockerfile, each runs a real binary with only flags that binary accepts
//! (its `--help` says which), and is configured only by `LARDER_…`
//! variables the config knows, which together make a valid distributed
//! config; nothing that scales has a fixed container name or host port;
//! Garage's image is the version the suite runs (`ops/install.sh`).

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use larder_config::{is_config_variable, QueueConfig, ServerConfig, StorageConfig};
use serde_yaml::{Mapping, Value};
use tests::process::service_command;

/// The services compose.yaml must define.
const SERVICES: &[&str] = &[
    "postgres",
    "rabbitmq",
    "garage",
    "garage-init",
    "ingest-api",
    "chunker-worker",
    "compressor-worker",
    "gc-scheduler",
];

/// The Larder services, each named after the binary it runs.
const LARDER_SERVICES: &[&str] = &[
    "ingest-api",
    "chunker-worker",
    "compressor-worker",
    "gc-scheduler",
];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn compose() -> Mapping {
    let path = repo().join("compose.yaml");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|error| panic!("reading {}: {error}", path.display()));
    let mut value: Value = serde_yaml::from_str(&text).expect("compose.yaml is valid YAML");
    value.apply_merge().expect("merge keys resolve");
    value.as_mapping().expect("a mapping at the top").clone()
}

fn service<'a>(compose: &'a Mapping, name: &str) -> &'a Mapping {
    compose["services"][name]
        .as_mapping()
        .unwrap_or_else(|| panic!("service {name} is missing"))
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_sequence()
        .expect("a list")
        .iter()
        .map(|item| item.as_str().expect("a string").to_owned())
        .collect()
}

/// The stage names of the Dockerfile (`FROM … AS name`).
fn dockerfile_stages(dockerfile: &Path) -> BTreeSet<String> {
    let text = std::fs::read_to_string(dockerfile)
        .unwrap_or_else(|error| panic!("reading {}: {error}", dockerfile.display()));
    text.lines()
        .filter_map(|line| {
            let words: Vec<&str> = line.split_whitespace().collect();
            match words.as_slice() {
                [from, _, as_, name]
                    if from.eq_ignore_ascii_case("FROM") && as_.eq_ignore_ascii_case("AS") =>
                {
                    Some((*name).to_owned())
                }
                _ => None,
            }
        })
        .collect()
}

/// The `--help` of a built binary.
fn help_of(binary: &str) -> String {
    let output = service_command(binary)
        .arg("--help")
        .output()
        .unwrap_or_else(|error| panic!("running {binary} --help: {error}"));
    assert!(output.status.success(), "{binary} --help: {output:?}");
    String::from_utf8(output.stdout).expect("UTF-8 help")
}

/// The long flags a help text lists (`--config <PATH>` gives `--config`).
fn flags_in(help: &str) -> BTreeSet<String> {
    help.split(|c: char| c.is_whitespace() || c == ',' || c == '[' || c == ']' || c == '=')
        .filter(|word| word.starts_with("--") && word.len() > 2)
        .map(str::to_owned)
        .collect()
}

/// A value of `${NAME:-default}` or `${NAME:?message}` as compose would
/// interpolate it with NAME unset: the default, or (where compose would
/// refuse to start) a valid value of the variable's kind.
fn interpolate(value: &str) -> String {
    let mut out = String::new();
    let mut rest = value;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let end = rest[start..].find('}').expect("a closing brace") + start;
        let expression = &rest[start + 2..end];
        if let Some((_, default)) = expression.split_once(":-") {
            out.push_str(default);
        } else if expression.contains(":?") {
            // Required: the only one is the token-signing secret.
            out.push_str("c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0MTI=");
        } else {
            panic!("${{{expression}}} has neither a default nor a required marker");
        }
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    out
}

#[test]
fn compose_yaml_passes_its_static_check() {
    let compose = compose();
    for name in SERVICES {
        service(&compose, name);
    }
    let dockerfile = repo().join("Dockerfile");
    let stages = dockerfile_stages(&dockerfile);

    // The Garage the stack runs is the one the suite tests.
    let install = std::fs::read_to_string(repo().join("ops/install.sh")).expect("ops/install.sh");
    let tested = install
        .lines()
        .find_map(|line| line.strip_prefix("readonly GARAGE_VERSION="))
        .expect("ops/install.sh names its Garage version");
    let image = format!("dxflrs/garage:v{tested}");
    assert_eq!(
        service(&compose, "garage")["image"].as_str(),
        Some(image.as_str()),
        "compose.yaml's Garage"
    );
    let dockerfile_text = std::fs::read_to_string(&dockerfile).expect("the Dockerfile");
    assert!(
        dockerfile_text.contains(&format!("FROM {image} AS garage")),
        "the Dockerfile's Garage (garage-init) is not {image}"
    );

    for (name, definition) in compose["services"].as_mapping().expect("services").iter() {
        let name = name.as_str().expect("a service name");
        if let Some(build) = definition.get("build") {
            assert_eq!(build["dockerfile"].as_str(), Some("Dockerfile"), "{name}");
            assert_eq!(build["context"].as_str(), Some("."), "{name}");
            let target = build["target"].as_str().expect("a build target");
            assert!(
                stages.contains(target),
                "{name}: no stage {target} in the Dockerfile: {stages:?}"
            );
        }
    }

    for name in LARDER_SERVICES {
        let definition = service(&compose, name);
        assert_eq!(
            definition["build"]["target"].as_str(),
            Some("larder"),
            "{name}"
        );
        assert!(
            definition.get("container_name").is_none(),
            "{name}: a fixed container name cannot scale"
        );
        for port in definition.get("ports").map(strings).unwrap_or_default() {
            // "CONTAINER" or "FIRST-LAST:CONTAINER": replicas get their own.
            let host = port.rsplit_once(':').map(|(host, _)| host);
            assert!(
                host.is_none_or(|host| host.contains('-')),
                "{name}: fixed host port {port} cannot scale"
            );
        }
        let healthcheck = strings(&definition["healthcheck"]["test"]);
        assert!(
            healthcheck.iter().any(|word| word.ends_with("/healthz")),
            "{name}: {healthcheck:?}"
        );

        // The command runs this service's binary with flags it accepts.
        let command = strings(&definition["command"]);
        assert_eq!(command[0], *name, "{name} runs its own binary");
        let help = help_of(name);
        let flags = flags_in(&help);
        for word in command.iter().skip(1).filter(|word| word.starts_with("--")) {
            let flag = word.split('=').next().expect("a flag");
            assert!(
                flags.contains(flag),
                "{name}: {flag} is not in its --help: {flags:?}"
            );
        }
        if let Some(mode) = command.iter().position(|word| word == "--mode") {
            // `--help` lists each possible value as "- VALUE: what it does".
            let value = &command[mode + 1];
            assert!(
                help.contains(&format!("- {value}:")),
                "{name}: --mode {value} is not a mode its --help lists"
            );
        }

        // The environment is config variables making a distributed config.
        let environment = definition["environment"]
            .as_mapping()
            .expect("an environment");
        let mut variables = Vec::new();
        for (key, value) in environment {
            let key = key.as_str().expect("a variable name");
            assert!(
                is_config_variable(key),
                "{name}: {key} is not a config variable"
            );
            let value = match value {
                Value::String(text) => interpolate(text),
                other => serde_yaml::to_string(other)
                    .expect("a scalar")
                    .trim()
                    .to_owned(),
            };
            variables.push((OsString::from(key), OsString::from(value)));
        }
        let config = ServerConfig::from_toml_and_env("", Path::new("compose.yaml"), variables)
            .unwrap_or_else(|error| {
                panic!("{name}: its environment is not a valid config: {error}")
            });
        assert!(
            matches!(config.queue, QueueConfig::Amqp { .. }),
            "{name}: {config:?}"
        );
        assert!(
            matches!(config.storage, StorageConfig::S3(_)),
            "{name}: {config:?}"
        );
        assert!(
            config.database.url.expose().starts_with("postgres://"),
            "{name}: PostgreSQL"
        );
    }

    // What scales (`--scale compressor-worker=4`) has no ports at all.
    for name in ["chunker-worker", "compressor-worker"] {
        assert!(service(&compose, name).get("ports").is_none(), "{name}");
    }
}
