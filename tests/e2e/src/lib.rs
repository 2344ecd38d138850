//! Harness for the cross-component tests: reaches the real services that `tests/run` starts.
//!
//! # Layout
//! - [`cluster`]: a `kube` client for the test API server; namespaces that delete themselves.
//! - Everything else comes from the shared test-support crate and is re-exported here so the
//!   tests name one harness: [`require_env`] and [`vars`] (which variable points at which
//!   service), [`rabbitmq`] (management API, publisher, dedicated nodes), [`command`] (run
//!   kubectl, helm, promtool, ...), [`wait`] (poll with a deadline), [`http`] and [`prom`].
//!
//! A test that needs a service asks for it through these helpers. When the service is missing,
//! the helper panics naming the service and saying to run the suite with `tests/run`: a test
//! never passes by skipping.

pub mod cluster;

pub use eventrouter_test_support::{
    command, free_port, free_ports, http, infra_script, prom, rabbitmq, repo_root, require_env,
    tool, tools_dir, unique_name, vars, wait,
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_harness_sits_in_the_repository() {
        assert!(
            repo_root()
                .join("tests")
                .join("e2e")
                .join("Cargo.toml")
                .is_file(),
            "tests/e2e not found under {}",
            repo_root().display()
        );
    }
}
