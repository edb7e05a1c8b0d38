//! Ownership and mode rules for the paths the agent trusts: its pin directory
//! on bpffs, its lock file, the key store. bpffs' root and `/tmp` are mode
//! 1777, so without these rules an unprivileged user could pre-create the pin
//! directory (and then unlink the pinned links, detaching XDP), hold the lock
//! (the agent cannot start) or plant the store's `-wal` file.
//!
//! The rules are pure functions over [`Stat`] (owner, mode, kind) so they are
//! tested without root; the `ensure_*`/`open_*` functions read metadata through
//! `std::os::unix` (no `unsafe`), create what is missing as 0700 directories and
//! 0600 files, tighten the read bits of what the agent itself owns, and refuse
//! everything else with the command that fixes it.

use std::{
    fs::{self, DirBuilder, File, OpenOptions},
    io,
    os::unix::fs::{
        DirBuilderExt as _, MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _,
    },
    path::{Path, PathBuf},
};

/// Write permission for group or others.
const GROUP_OTHER_WRITE: u32 = 0o022;
/// Any permission for group or others.
const GROUP_OTHER_ANY: u32 = 0o077;
/// The sticky bit: only an entry's owner may rename or unlink it.
const STICKY: u32 = 0o1000;
/// What the agent creates and tightens its private directories to.
pub const PRIVATE_DIR_MODE: u32 = 0o700;
/// What the agent creates and tightens its private files to.
pub const PRIVATE_FILE_MODE: u32 = 0o600;

/// The effective uid these rules compare owners with.
#[must_use]
pub fn euid() -> u32 {
    nix::unistd::geteuid().as_raw()
}

/// What a path is, as far as these rules care.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Dir,
    File,
    Symlink,
    Other,
}

impl Kind {
    const fn name(self) -> &'static str {
        match self {
            Kind::Dir => "a directory",
            Kind::File => "a regular file",
            Kind::Symlink => "a symbolic link",
            Kind::Other => "a special file",
        }
    }
}

/// The part of a path's metadata the rules read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stat {
    pub uid: u32,
    /// Permission bits with setuid/setgid/sticky (`st_mode & 0o7777`).
    pub mode: u32,
    pub kind: Kind,
}

impl Stat {
    /// From `lstat` (`symlink_metadata`) or `fstat` (`File::metadata`).
    #[must_use]
    pub fn of(meta: &fs::Metadata) -> Self {
        let ty = meta.file_type();
        let kind = if ty.is_symlink() {
            Kind::Symlink
        } else if ty.is_dir() {
            Kind::Dir
        } else if ty.is_file() {
            Kind::File
        } else {
            Kind::Other
        };
        Self {
            uid: meta.uid(),
            mode: meta.mode() & 0o7777,
            kind,
        }
    }
}

/// What a rule found wrong, before it is given a path and a fix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Problem {
    /// Owned by this uid, which the rule does not trust.
    Owner(u32),
    /// Writable by group or others (these are the mode bits).
    Writable(u32),
    /// Not the kind of file the rule wants.
    Kind { found: Kind, wanted: Kind },
}

/// A rule's verdict on an acceptable path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Ok,
    /// Ours, but readable by others: set these mode bits.
    Tighten(u32),
}

/// A directory only the agent uses (the pin directory and the layout
/// directory under it, the lock directory): a real directory, owned by the
/// agent's euid, not writable by group or others; read or search bits for
/// others are removed (`Tighten(0o700)`).
pub fn private_dir(st: Stat, euid: u32) -> Result<Verdict, Problem> {
    private(st, euid, Kind::Dir, PRIVATE_DIR_MODE)
}

/// A file only the agent uses (the lock file, the key store and its `-wal`
/// and `-shm`): a regular file owned by the agent's euid, not writable by
/// group or others (whoever could write it may hold it open); read bits for
/// others are removed (`Tighten(0o600)`).
pub fn private_file(st: Stat, euid: u32) -> Result<Verdict, Problem> {
    private(st, euid, Kind::File, PRIVATE_FILE_MODE)
}

/// The rule of [`private_dir`] and [`private_file`]: of `kind`, the agent's,
/// refused when others may write it (someone else may already have put
/// something inside, or hold it open: the operator looks first), tightened
/// to `mode` when others may only read it.
fn private(st: Stat, euid: u32, kind: Kind, mode: u32) -> Result<Verdict, Problem> {
    if st.kind != kind {
        return Err(Problem::Kind {
            found: st.kind,
            wanted: kind,
        });
    }
    if st.uid != euid {
        return Err(Problem::Owner(st.uid));
    }
    if st.mode & GROUP_OTHER_WRITE != 0 {
        return Err(Problem::Writable(st.mode));
    }
    if st.mode & GROUP_OTHER_ANY != 0 {
        return Ok(Verdict::Tighten(mode));
    }
    Ok(Verdict::Ok)
}

/// The directory holding the key store (SQLite creates `-wal` and `-shm`
/// next to the database, so whoever may create files there may plant them):
/// owned by the agent's euid or root and writable by neither group nor
/// others, sticky or not. It may be shared (`/var/lib`), so it is never
/// tightened.
pub fn store_dir(st: Stat, euid: u32) -> Result<Verdict, Problem> {
    dir_of_root_or(st, euid)?;
    if st.mode & GROUP_OTHER_WRITE != 0 {
        return Err(Problem::Writable(st.mode));
    }
    Ok(Verdict::Ok)
}

/// A directory above one of the agent's: owned by root or the agent's euid,
/// and either not writable by group or others or sticky (`/tmp`, bpffs'
/// root), so nobody else can rename or replace what lies below.
pub fn ancestor(st: Stat, euid: u32) -> Result<Verdict, Problem> {
    dir_of_root_or(st, euid)?;
    if st.mode & GROUP_OTHER_WRITE != 0 && st.mode & STICKY == 0 {
        return Err(Problem::Writable(st.mode));
    }
    Ok(Verdict::Ok)
}

/// A directory owned by root or the agent's euid: the part [`store_dir`] and
/// [`ancestor`] share.
fn dir_of_root_or(st: Stat, euid: u32) -> Result<(), Problem> {
    if st.kind != Kind::Dir {
        return Err(Problem::Kind {
            found: st.kind,
            wanted: Kind::Dir,
        });
    }
    if st.uid != euid && st.uid != 0 {
        return Err(Problem::Owner(st.uid));
    }
    Ok(())
}

/// Which path a rule was applied to; names it and the fix in errors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    PinDir,
    Pin,
    LockDir,
    LockFile,
    StoreDir,
    StoreFile,
    Ancestor,
}

impl Role {
    const fn what(self) -> &'static str {
        match self {
            Role::PinDir => "pin directory",
            Role::Pin => "pinned object",
            Role::LockDir => "lock directory",
            Role::LockFile => "lock file",
            Role::StoreDir => "key store directory",
            Role::StoreFile => "key store file",
            Role::Ancestor => "parent directory",
        }
    }

    fn fix(self, path: &Path, problem: Problem, euid: u32) -> String {
        let p = path.display();
        let owner = if euid == 0 {
            "root".to_owned()
        } else {
            euid.to_string()
        };
        match (self, problem) {
            (Role::PinDir | Role::LockDir, Problem::Owner(_)) => {
                format!("remove it (rm -r {p}) or chown {owner} and chmod 0700 it")
            }
            (Role::PinDir | Role::LockDir, Problem::Writable(_)) => format!(
                "check that nothing foreign is inside, then chmod 0700 {p} (or remove it: rm -r {p})"
            ),
            (Role::Pin | Role::LockFile, _) => {
                format!("remove it (rm {p}); the agent creates its own")
            }
            (Role::StoreDir, Problem::Owner(_)) => format!(
                "chown {owner} and chmod 0700 {p}, or point store.path into a directory of {owner}"
            ),
            (Role::StoreDir, Problem::Writable(_)) => format!(
                "chmod 0700 {p}, or point store.path into a directory only {owner} can write"
            ),
            (Role::StoreFile, Problem::Owner(_)) => {
                format!("check the keys in it, then chown {owner} {p}")
            }
            (Role::StoreFile, Problem::Writable(_)) => {
                format!("check the keys in it, then chmod 0600 {p}")
            }
            (Role::Ancestor, Problem::Owner(_)) => {
                format!("chown {owner} {p}, or choose a path whose parents {owner} owns")
            }
            (Role::Ancestor, Problem::Writable(_)) => {
                format!("chmod go-w {p} (or chmod +t {p}), or choose another path")
            }
            (_, Problem::Kind { .. }) => {
                format!("remove it (rm {p}) or point the configuration at the real path")
            }
        }
    }
}

/// Why a path the agent trusts was refused.
#[derive(Debug, thiserror::Error)]
pub enum FsGuardError {
    #[error("{what} {} is owned by uid {uid}: {fix}", path.display())]
    Owner {
        what: &'static str,
        path: PathBuf,
        uid: u32,
        fix: String,
    },
    #[error("{what} {} is writable by group or others (mode {mode:04o}): {fix}", path.display())]
    Writable {
        what: &'static str,
        path: PathBuf,
        mode: u32,
        fix: String,
    },
    #[error("{what} {} is {}, not {}: {fix}", path.display(), found.name(), wanted.name())]
    Kind {
        what: &'static str,
        path: PathBuf,
        found: Kind,
        wanted: Kind,
        fix: String,
    },
    #[error("{action} {}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl FsGuardError {
    fn from_problem(role: Role, path: &Path, problem: Problem, euid: u32) -> Self {
        let what = role.what();
        let fix = role.fix(path, problem, euid);
        let path = path.to_path_buf();
        match problem {
            Problem::Owner(uid) => Self::Owner {
                what,
                path,
                uid,
                fix,
            },
            Problem::Writable(mode) => Self::Writable {
                what,
                path,
                mode,
                fix,
            },
            Problem::Kind { found, wanted } => Self::Kind {
                what,
                path,
                found,
                wanted,
                fix,
            },
        }
    }

    fn io(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> Self {
        let path = path.to_path_buf();
        move |source| Self::Io {
            action,
            path,
            source,
        }
    }
}

type Rule = fn(Stat, u32) -> Result<Verdict, Problem>;

/// `lstat` a path: `None` when it does not exist.
fn lstat(path: &Path) -> Result<Option<Stat>, FsGuardError> {
    match fs::symlink_metadata(path) {
        Ok(meta) => Ok(Some(Stat::of(&meta))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(FsGuardError::io("inspecting", path)(e)),
    }
}

/// Apply the rule `check` to `st` (of `path`), tightening the mode when it says so.
fn enforce(
    path: &Path,
    st: Stat,
    check: Rule,
    role: Role,
    euid: u32,
    chmod: impl FnOnce(u32) -> io::Result<()>,
) -> Result<(), FsGuardError> {
    match check(st, euid).map_err(|p| FsGuardError::from_problem(role, path, p, euid))? {
        Verdict::Ok => Ok(()),
        Verdict::Tighten(mode) => {
            chmod(mode).map_err(FsGuardError::io("tightening the mode of", path))?;
            tracing::info!(
                path = %path.display(),
                from = format!("{:04o}", st.mode),
                to = format!("{mode:04o}"),
                "{} was readable by others: tightened",
                role.what()
            );
            Ok(())
        }
    }
}

/// Check every existing directory above `path` with [`ancestor`], after
/// resolving symbolic links (so `/var/run` is checked as `/run`). With
/// `same_fs` the walk stops at the first directory on another filesystem:
/// for pins, only the part on bpffs is the agent's concern.
pub fn check_ancestors(path: &Path, same_fs: bool, euid: u32) -> Result<(), FsGuardError> {
    let Some(parent) = path.parent() else {
        return Ok(());
    };
    let parent = if parent.as_os_str().is_empty() {
        Path::new(".")
    } else {
        parent
    };
    let Some(existing) = parent.ancestors().find(|p| p.exists()) else {
        return Ok(());
    };
    let real = fs::canonicalize(existing).map_err(FsGuardError::io("resolving", existing))?;
    let mut device = None;
    for dir in real.ancestors() {
        let meta = fs::metadata(dir).map_err(FsGuardError::io("inspecting", dir))?;
        let dev = meta.dev();
        if same_fs && *device.get_or_insert(dev) != dev {
            break;
        }
        enforce(dir, Stat::of(&meta), ancestor, Role::Ancestor, euid, |_| {
            Ok(())
        })?;
    }
    Ok(())
}

/// Create `path` as a 0700 directory when absent, then check it with the rule
/// `check` (tightening when the rule says so). A symbolic link is refused, never
/// followed.
pub fn ensure_dir(path: &Path, check: Rule, role: Role, euid: u32) -> Result<(), FsGuardError> {
    if lstat(path)?.is_none() {
        match DirBuilder::new().mode(PRIVATE_DIR_MODE).create(path) {
            Ok(()) => {}
            // Someone else made it in between: the check below judges it.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(FsGuardError::io("creating", path)(e)),
        }
    }
    let st = lstat(path)?.ok_or_else(|| {
        FsGuardError::io("creating", path)(io::Error::from(io::ErrorKind::NotFound))
    })?;
    enforce(path, st, check, role, euid, |mode| {
        fs::set_permissions(path, fs::Permissions::from_mode(mode))
    })
}

/// Create (0700) or check the pin directory `pin_root` and the layout
/// directory `layout_dir` under it. The directories above `pin_root` on the
/// same filesystem must be [`ancestor`]s; missing ones are created 0700 and
/// must then be private too. Every pin already in `layout_dir` must be
/// owned by the agent's euid.
pub fn ensure_pin_dirs(pin_root: &Path, layout_dir: &Path, euid: u32) -> Result<(), FsGuardError> {
    check_ancestors(pin_root, true, euid)?;
    let mut missing: Vec<&Path> = pin_root
        .ancestors()
        .skip(1)
        .take_while(|p| !p.as_os_str().is_empty() && lstat(p).ok().flatten().is_none())
        .collect();
    missing.reverse();
    for dir in missing {
        ensure_dir(dir, private_dir, Role::PinDir, euid)?;
    }
    ensure_dir(pin_root, private_dir, Role::PinDir, euid)?;
    ensure_dir(layout_dir, private_dir, Role::PinDir, euid)?;
    for entry in fs::read_dir(layout_dir).map_err(FsGuardError::io("listing", layout_dir))? {
        let entry = entry.map_err(FsGuardError::io("listing", layout_dir))?;
        let path = entry.path();
        let meta = fs::symlink_metadata(&path).map_err(FsGuardError::io("inspecting", &path))?;
        if meta.uid() != euid {
            return Err(FsGuardError::from_problem(
                Role::Pin,
                &path,
                Problem::Owner(meta.uid()),
                euid,
            ));
        }
    }
    Ok(())
}

/// Open (creating 0600) the lock file `path` in its private directory
/// (created 0700). The file is opened with `O_NOFOLLOW` and judged by
/// `fstat` of what was opened, so neither a symbolic link nor a file someone
/// else owns is ever locked.
pub fn open_lock(path: &Path, euid: u32) -> Result<File, FsGuardError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        check_ancestors(dir, false, euid)?;
        ensure_dir(dir, private_dir, Role::LockDir, euid)?;
    }
    open_private_file(path, Role::LockFile, euid)
}

/// Open or create (0600) a private file without following a symbolic link,
/// and check what was opened with [`private_file`].
fn open_private_file(path: &Path, role: Role, euid: u32) -> Result<File, FsGuardError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(PRIVATE_FILE_MODE)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| {
            if e.raw_os_error() == Some(libc::ELOOP) {
                FsGuardError::from_problem(
                    role,
                    path,
                    Problem::Kind {
                        found: Kind::Symlink,
                        wanted: Kind::File,
                    },
                    euid,
                )
            } else {
                FsGuardError::io("opening", path)(e)
            }
        })?;
    let meta = file
        .metadata()
        .map_err(FsGuardError::io("inspecting", path))?;
    enforce(path, Stat::of(&meta), private_file, role, euid, |mode| {
        file.set_permissions(fs::Permissions::from_mode(mode))
    })?;
    Ok(file)
}

/// Create (0700) or check the key store's directory `dir` (its parents must
/// be [`ancestor`]s; missing ones are created 0700).
pub fn ensure_store_dir(dir: &Path, euid: u32) -> Result<(), FsGuardError> {
    check_ancestors(dir, false, euid)?;
    let mut missing: Vec<&Path> = dir
        .ancestors()
        .take_while(|p| !p.as_os_str().is_empty() && lstat(p).ok().flatten().is_none())
        .collect();
    missing.reverse();
    for d in missing {
        ensure_dir(d, store_dir, Role::StoreDir, euid)?;
    }
    ensure_dir(dir, store_dir, Role::StoreDir, euid)
}

/// Create (0600) or check the key store file, and its `-wal` and `-shm`
/// when they exist.
pub fn ensure_store_file(path: &Path, euid: u32) -> Result<(), FsGuardError> {
    drop(open_private_file(path, Role::StoreFile, euid)?);
    for suffix in ["-wal", "-shm"] {
        let mut side = path.as_os_str().to_owned();
        side.push(suffix);
        let side = PathBuf::from(side);
        if let Some(st) = lstat(&side)? {
            enforce(&side, st, private_file, Role::StoreFile, euid, |mode| {
                fs::set_permissions(&side, fs::Permissions::from_mode(mode))
            })?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const ME: u32 = 1000;
    const NOBODY: u32 = 65534;

    fn dir(uid: u32, mode: u32) -> Stat {
        Stat {
            uid,
            mode,
            kind: Kind::Dir,
        }
    }

    fn file(uid: u32, mode: u32) -> Stat {
        Stat {
            uid,
            mode,
            kind: Kind::File,
        }
    }

    #[test]
    fn private_dirs_are_ours_and_closed() {
        assert_eq!(private_dir(dir(ME, 0o700), ME), Ok(Verdict::Ok));
        assert_eq!(private_dir(dir(ME, 0o755), ME), Ok(Verdict::Tighten(0o700)));
        assert_eq!(
            private_dir(dir(NOBODY, 0o700), ME),
            Err(Problem::Owner(NOBODY))
        );
        // Root is not "ours" for a directory only the agent uses.
        assert_eq!(private_dir(dir(0, 0o700), ME), Err(Problem::Owner(0)));
        assert_eq!(
            private_dir(dir(ME, 0o777), ME),
            Err(Problem::Writable(0o777))
        );
        assert_eq!(
            private_dir(dir(ME, 0o1777), ME),
            Err(Problem::Writable(0o1777))
        );
        assert_eq!(
            private_dir(dir(ME, 0o770), ME),
            Err(Problem::Writable(0o770))
        );
        assert_eq!(
            private_dir(
                Stat {
                    uid: ME,
                    mode: 0o777,
                    kind: Kind::Symlink
                },
                ME
            ),
            Err(Problem::Kind {
                found: Kind::Symlink,
                wanted: Kind::Dir
            })
        );
    }

    #[test]
    fn private_files_are_ours_and_0600() {
        assert_eq!(private_file(file(ME, 0o600), ME), Ok(Verdict::Ok));
        assert_eq!(
            private_file(file(ME, 0o644), ME),
            Ok(Verdict::Tighten(0o600))
        );
        assert_eq!(
            private_file(file(NOBODY, 0o600), ME),
            Err(Problem::Owner(NOBODY))
        );
        assert_eq!(
            private_file(file(ME, 0o666), ME),
            Err(Problem::Writable(0o666))
        );
        assert_eq!(
            private_file(dir(ME, 0o700), ME),
            Err(Problem::Kind {
                found: Kind::Dir,
                wanted: Kind::File
            })
        );
    }

    #[test]
    fn store_dirs_may_be_shared_but_not_writable() {
        assert_eq!(store_dir(dir(ME, 0o700), ME), Ok(Verdict::Ok));
        assert_eq!(store_dir(dir(0, 0o755), ME), Ok(Verdict::Ok));
        assert_eq!(
            store_dir(dir(NOBODY, 0o700), ME),
            Err(Problem::Owner(NOBODY))
        );
        // Sticky does not help: others could create the -wal file first.
        assert_eq!(
            store_dir(dir(0, 0o1777), ME),
            Err(Problem::Writable(0o1777))
        );
        assert_eq!(store_dir(dir(ME, 0o775), ME), Err(Problem::Writable(0o775)));
    }

    #[test]
    fn ancestors_may_be_sticky() {
        assert_eq!(ancestor(dir(0, 0o755), ME), Ok(Verdict::Ok));
        assert_eq!(ancestor(dir(ME, 0o700), ME), Ok(Verdict::Ok));
        assert_eq!(ancestor(dir(0, 0o1777), ME), Ok(Verdict::Ok));
        assert_eq!(ancestor(dir(0, 0o777), ME), Err(Problem::Writable(0o777)));
        assert_eq!(
            ancestor(dir(NOBODY, 0o755), ME),
            Err(Problem::Owner(NOBODY))
        );
    }

    #[test]
    fn errors_name_the_path_and_the_fix() {
        let e = FsGuardError::from_problem(
            Role::PinDir,
            Path::new("/sys/fs/bpf/x"),
            Problem::Owner(NOBODY),
            0,
        );
        assert_eq!(
            e.to_string(),
            "pin directory /sys/fs/bpf/x is owned by uid 65534: remove it \
             (rm -r /sys/fs/bpf/x) or chown root and chmod 0700 it"
        );
        let e = FsGuardError::from_problem(
            Role::LockFile,
            Path::new("/run/keyfence/a.lock"),
            Problem::Owner(NOBODY),
            0,
        );
        assert_eq!(
            e.to_string(),
            "lock file /run/keyfence/a.lock is owned by uid 65534: remove it \
             (rm /run/keyfence/a.lock); the agent creates its own"
        );
        let e = FsGuardError::from_problem(
            Role::StoreDir,
            Path::new("/srv/kf"),
            Problem::Writable(0o777),
            0,
        );
        assert!(e.to_string().contains("mode 0777"), "{e}");
        assert!(e.to_string().contains("chmod 0700 /srv/kf"), "{e}");
    }

    /// A directory under the system temp dir, removed when dropped.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new() -> Self {
            let mut b = [0u8; 8];
            getrandom::fill(&mut b).expect("random bytes");
            let path =
                std::env::temp_dir().join(format!("keyfence-fsguard-{}", u64::from_ne_bytes(b)));
            DirBuilder::new()
                .mode(0o700)
                .create(&path)
                .expect("creating the scratch dir");
            Self(path)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn mode_of(path: &Path) -> u32 {
        fs::symlink_metadata(path).expect("stat").mode() & 0o7777
    }

    /// The lock directory (`/run/keyfence` in production) on a temp dir.
    #[test]
    fn the_lock_directory_is_created_0700_and_tightened() {
        let scratch = Scratch::new();
        let dir = scratch.0.join("keyfence");
        let lock = dir.join("x.lock");
        let file = open_lock(&lock, euid()).expect("a fresh lock");
        assert_eq!(mode_of(&dir), 0o700);
        assert_eq!(mode_of(&lock), 0o600);
        drop(file);

        // An older agent's 0755 directory and 0644 lock are tightened.
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).expect("chmod");
        fs::set_permissions(&lock, fs::Permissions::from_mode(0o644)).expect("chmod");
        open_lock(&lock, euid()).expect("tightened");
        assert_eq!(mode_of(&dir), 0o700);
        assert_eq!(mode_of(&lock), 0o600);

        // A directory others could write is refused, untouched.
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o777)).expect("chmod");
        let e = open_lock(&lock, euid()).expect_err("writable by others");
        assert!(matches!(e, FsGuardError::Writable { .. }), "{e}");
        assert_eq!(mode_of(&dir), 0o777);
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).expect("chmod");

        // So is a lock file others could write (they may hold it open).
        fs::set_permissions(&lock, fs::Permissions::from_mode(0o666)).expect("chmod");
        let e = open_lock(&lock, euid()).expect_err("writable lock");
        assert!(matches!(e, FsGuardError::Writable { .. }), "{e}");
        fs::remove_file(&lock).expect("rm");

        // A symbolic link in the lock's place is never followed.
        let target = scratch.0.join("elsewhere");
        fs::write(&target, b"").expect("target");
        std::os::unix::fs::symlink(&target, &lock).expect("symlink");
        let e = open_lock(&lock, euid()).expect_err("symlink");
        assert!(
            matches!(
                e,
                FsGuardError::Kind {
                    found: Kind::Symlink,
                    ..
                }
            ),
            "{e}"
        );
        fs::remove_file(&lock).expect("rm");

        // Nor is a symbolic link in the directory's place.
        let real = scratch.0.join("real");
        fs::rename(&dir, &real).expect("mv");
        std::os::unix::fs::symlink(&real, &dir).expect("symlink");
        let e = open_lock(&lock, euid()).expect_err("symlinked dir");
        assert!(matches!(e, FsGuardError::Kind { .. }), "{e}");
    }

    #[test]
    fn a_parent_writable_by_others_is_refused_unless_sticky() {
        let scratch = Scratch::new();
        let open = scratch.0.join("open");
        fs::create_dir(&open).expect("mkdir");
        fs::set_permissions(&open, fs::Permissions::from_mode(0o777)).expect("chmod");
        let e = ensure_store_dir(&open.join("store"), euid()).expect_err("open parent");
        assert!(matches!(e, FsGuardError::Writable { what, .. } if what == "parent directory"));
        fs::set_permissions(&open, fs::Permissions::from_mode(0o1777)).expect("chmod");
        ensure_store_dir(&open.join("store"), euid()).expect("sticky parent");
        assert_eq!(mode_of(&open.join("store")), 0o700);
    }

    #[test]
    fn store_directories_and_files() {
        let scratch = Scratch::new();
        let dir = scratch.0.join("a/b");
        ensure_store_dir(&dir, euid()).expect("created");
        assert_eq!(mode_of(&scratch.0.join("a")), 0o700);
        assert_eq!(mode_of(&dir), 0o700);
        // A shared, closed directory is fine and left as it is.
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).expect("chmod");
        ensure_store_dir(&dir, euid()).expect("0755");
        assert_eq!(mode_of(&dir), 0o755);
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o775)).expect("chmod");
        assert!(ensure_store_dir(&dir, euid()).is_err());
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).expect("chmod");

        let db = dir.join("keyfence.db");
        ensure_store_file(&db, euid()).expect("created");
        assert_eq!(mode_of(&db), 0o600);
        let wal = dir.join("keyfence.db-wal");
        fs::write(&wal, b"").expect("wal");
        fs::set_permissions(&wal, fs::Permissions::from_mode(0o666)).expect("chmod");
        let e = ensure_store_file(&db, euid()).expect_err("writable wal");
        assert!(e.to_string().contains("keyfence.db-wal"), "{e}");
        fs::set_permissions(&wal, fs::Permissions::from_mode(0o644)).expect("chmod");
        ensure_store_file(&db, euid()).expect("tightened");
        assert_eq!(mode_of(&wal), 0o600);
    }
}
