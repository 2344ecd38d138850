//! Running the command-line tools the tests drive (kubectl, helm, promtool, rabbitmqctl,
//! kubernetes-validate) and capturing what they print, with errors that show the command line
//! and its stderr.

use std::process::{ExitStatus, Output};

use anyhow::{Context, bail};

/// What a finished command printed, as text.
#[derive(Debug)]
pub struct CommandOutput {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl CommandOutput {
    fn from_output(output: Output) -> Self {
        Self {
            status: output.status,
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }

    /// True when the command exited with status 0.
    pub fn success(&self) -> bool {
        self.status.success()
    }
}

/// Runs `command` to completion and captures its output, whatever its exit status. Fails only
/// when it cannot be started (e.g. the program is not on PATH).
pub fn run(command: &mut std::process::Command) -> anyhow::Result<CommandOutput> {
    let output = command
        .output()
        .with_context(|| format!("could not start {command:?} (is it installed? run tests/run)"))?;
    Ok(CommandOutput::from_output(output))
}

/// Runs `command` and returns its stdout; a non-zero exit is an error carrying its stderr.
pub fn run_ok(command: &mut std::process::Command) -> anyhow::Result<String> {
    let output = run(command)?;
    stdout_of_success(&*command, output)
}

/// The stdout of a command that exited with 0; otherwise an error with the command and stderr.
fn stdout_of_success(
    command: &dyn std::fmt::Debug,
    output: CommandOutput,
) -> anyhow::Result<String> {
    if !output.success() {
        bail!(
            "{command:?} failed ({}):\n{}{}",
            output.status,
            output.stderr,
            output.stdout
        );
    }
    Ok(output.stdout)
}

/// [`run`] for async tests: does not block the runtime while the command runs.
pub async fn run_async(command: &mut tokio::process::Command) -> anyhow::Result<CommandOutput> {
    let output = command
        .output()
        .await
        .with_context(|| format!("could not start {command:?} (is it installed? run tests/run)"))?;
    Ok(CommandOutput::from_output(output))
}

/// [`run_ok`] for async tests.
pub async fn run_ok_async(command: &mut tokio::process::Command) -> anyhow::Result<String> {
    let output = run_async(command).await?;
    stdout_of_success(&*command, output)
}

/// Builds a binary of the workspace (`cargo build -p PACKAGE --bin BIN`, the debug profile the
/// tests are built with; a no-op when it is fresh) and returns its path.
pub fn workspace_binary(package: &str, bin: &str) -> anyhow::Result<std::path::PathBuf> {
    let root = crate::repo_root();
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    run_ok(
        std::process::Command::new(cargo)
            .args(["build", "--quiet", "-p", package, "--bin", bin])
            .current_dir(&root),
    )?;
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .map(|t| if t.is_absolute() { t } else { root.join(t) })
        .unwrap_or_else(|| root.join("target"));
    let path = target.join("debug").join(bin);
    if !path.is_file() {
        bail!("cargo built {bin} but {} does not exist", path.display());
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn captures_stdout_and_stderr() {
        let output = run(Command::new("sh").args(["-c", "echo out; echo err >&2; exit 3"]))
            .expect("sh runs");
        assert_eq!(output.stdout, "out\n");
        assert_eq!(output.stderr, "err\n");
        assert_eq!(output.status.code(), Some(3));
    }

    #[test]
    fn run_ok_reports_stderr_of_a_failure() {
        let error = run_ok(Command::new("sh").args(["-c", "echo broken >&2; exit 1"]))
            .expect_err("exit 1 is an error");
        assert!(error.to_string().contains("broken"), "{error}");
    }

    #[test]
    fn missing_program_is_an_error() {
        let error = run(&mut Command::new("eventrouter-no-such-program")).expect_err("not found");
        assert!(
            error.to_string().contains("eventrouter-no-such-program"),
            "{error}"
        );
    }

    #[tokio::test]
    async fn async_run_ok_returns_stdout() {
        let stdout = run_ok_async(tokio::process::Command::new("sh").args(["-c", "echo hi"]))
            .await
            .expect("sh runs");
        assert_eq!(stdout, "hi\n");
    }
}
