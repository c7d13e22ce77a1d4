//! The workload executor: `execve` with exactly the declared environment.
//!
//! libcontainer's default executor sets the process env from the spec and
//! then *adds* `HOME` when it is missing, and resolves the command through
//! `execvp`. CellOS's invariant is stricter: the workload's
//! `/proc/<pid>/environ` is the declared env byte for byte, in declared
//! order. So this executor ignores libcontainer's env map and calls
//! `execve(path, argv, spec.process.env)` itself. The command is resolved
//! like `execvpe` would: used as is when it contains `/`, else searched in
//! the declared `PATH`, else in a default search path — the default is only
//! used to *find* the program, it is never put into the environment.
//!
//! Runs inside the container init process, after pivot_root and capability
//! drop, single-threaded, before the start signal (validate) and at start
//! (exec). `exec` installs the default seccomp filter (see `seccomp`) as
//! its last step before `execve`.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use libcontainer::workload::{
    Executor, ExecutorError, ExecutorSetEnvsError, ExecutorValidationError,
};
use oci_spec::runtime::Spec;

/// Search path used to find a bare command name when the cell declares no
/// `PATH` (not exported to the workload).
pub const DEFAULT_SEARCH_PATH: &str =
    "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

#[derive(Clone, Default)]
pub struct ExactEnvExecutor;

fn args_and_env(spec: &Spec) -> (Vec<String>, Vec<String>) {
    let p = spec.process().as_ref();
    let args = p.and_then(|p| p.args().clone()).unwrap_or_default();
    let env = p.and_then(|p| p.env().clone()).unwrap_or_default();
    (args, env)
}

/// Resolve `cmd` the way `execvpe` would with `env`'s PATH.
pub fn resolve_command(cmd: &str, env: &[String]) -> Result<PathBuf, String> {
    if cmd.is_empty() {
        return Err("command is empty".into());
    }
    if cmd.contains('/') {
        let p = PathBuf::from(cmd);
        return check_executable(&p).map(|_| p);
    }
    let path = env
        .iter()
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or(DEFAULT_SEARCH_PATH);
    for dir in path.split(':').filter(|d| !d.is_empty()) {
        let p = Path::new(dir).join(cmd);
        if check_executable(&p).is_ok() {
            return Ok(p);
        }
    }
    Err(format!("command {cmd:?} not found in {path}"))
}

fn check_executable(p: &Path) -> Result<(), String> {
    match std::fs::metadata(p) {
        Ok(m) if m.is_file() && m.permissions().mode() & 0o111 != 0 => Ok(()),
        Ok(m) if m.is_dir() => Err(format!("command {} is a directory", p.display())),
        Ok(_) => Err(format!("command {} is not executable", p.display())),
        Err(e) => Err(format!("command {}: {e}", p.display())),
    }
}

fn cstrings(v: &[String]) -> Result<Vec<CString>, ExecutorError> {
    v.iter()
        .map(|s| CString::new(s.as_bytes()).map_err(|_| ExecutorError::InvalidArg))
        .collect()
}

/// Default SIGPIPE disposition (a writer to a closed pipe dies, as
/// everywhere outside Rust's runtime).
pub(crate) fn reset_sigpipe() {
    // SAFETY: installs the default disposition, no handler code; the
    // process is single-threaded and about to execve.
    let _ = unsafe {
        nix::sys::signal::signal(
            nix::sys::signal::Signal::SIGPIPE,
            nix::sys::signal::SigHandler::SigDfl,
        )
    };
}

impl Executor for ExactEnvExecutor {
    fn exec(&self, spec: &Spec) -> Result<(), ExecutorError> {
        let (args, env) = args_and_env(spec);
        let first = args.first().ok_or(ExecutorError::InvalidArg)?;
        let path = resolve_command(first, &env).map_err(ExecutorError::Other)?;
        let path =
            CString::new(path.as_os_str().as_bytes()).map_err(|_| ExecutorError::InvalidArg)?;
        let argv = cstrings(&args)?;
        let envp = cstrings(&env)?;
        let programs =
            crate::seccomp::default_programs().map_err(|e| ExecutorError::Other(e.to_string()))?;
        crate::seccomp::apply(&programs).map_err(|e| ExecutorError::Other(e.to_string()))?;
        // The shim is a Rust program, which ignores SIGPIPE, and an ignored
        // signal survives execve: give the workload the default.
        reset_sigpipe();
        let err = nix::unistd::execve(&path, &argv, &envp).unwrap_err();
        Err(ExecutorError::Other(format!(
            "execve {}: {err}",
            path.to_string_lossy()
        )))
    }

    fn validate(&self, spec: &Spec) -> Result<(), ExecutorValidationError> {
        let (args, env) = args_and_env(spec);
        let first = args.first().ok_or_else(|| {
            ExecutorValidationError::ArgValidationError("command is empty".into())
        })?;
        resolve_command(first, &env)
            .map(|_| ())
            .map_err(ExecutorValidationError::ArgValidationError)
    }

    fn setup_envs(
        &self,
        _envs: std::collections::HashMap<String, String>,
    ) -> Result<(), ExecutorSetEnvsError> {
        // The environment is passed to execve explicitly; the init
        // process's own environment is never inherited.
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_like_execvpe() {
        assert_eq!(
            resolve_command("sh", &[]).unwrap().file_name().unwrap(),
            "sh"
        );
        assert!(resolve_command("/bin/sh", &[]).is_ok());
        let e = resolve_command("sh", &["PATH=/nonexistent".into()]).unwrap_err();
        assert!(e.contains("not found in /nonexistent"), "{e}");
        assert!(
            resolve_command("/etc/passwd", &[])
                .unwrap_err()
                .contains("not executable")
        );
        assert!(resolve_command("/", &[]).unwrap_err().contains("directory"));
        assert!(resolve_command("", &[]).is_err());
    }
}
