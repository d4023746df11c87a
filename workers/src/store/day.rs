//! One UTC day's LMDB environment: opened once per process, its named
//! databases, map resizing, and the transactions that make resizing safe.
//!
//! heed refuses a second `Env` on a path this process already opened
//! (`EnvAlreadyOpened`), so days are opened through a process-wide registry:
//! a [`StoreReader`](super::StoreReader) opened while a [`Store`](super::Store)
//! of the same directory lives in this process shares the writer's
//! environment (and so sees every commit), which is also what LMDB wants (one
//! environment per file per process).

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{Arc, LazyLock, Mutex, PoisonError, RwLock, RwLockReadGuard, Weak},
    time::Duration,
};

use heed::{
    types::Bytes, CompactionOption, Database, Env, EnvFlags, EnvOpenOptions, MdbError, RoTxn,
    RwTxn, WithTls,
};

use super::{
    error::{corrupt, io, lmdb, StoreError},
    rollup::{self, Rollup},
    runs::{slot_name, RUN_SLOTS},
};

/// The `meta` value of `format_version` this build writes into a new day.
///
/// Version 2 added the `recent` databases, version 3 the `rollups` (coarse
/// windows derived from fine ones, see [`super::rollup`]), version 4
/// stores a window of one sample in 16 bytes instead of 64
/// ([`Aggregate::encode`](crate::window::Aggregate::encode)), and version
/// 5 the sorted runs ([`super::runs`]): compaction writes a day's windows
/// there instead of into `windows`. This build reads every version, and
/// every day it opens for writing becomes version 5: a version 1 day gets
/// its `recent` databases, every day its run slots; what `windows` holds
/// stays there (read, never written again); values are written short from
/// then on; a version 1 or 2 day keeps having no rollups (its `recent`
/// windows were written at every resolution). Older builds refuse a newer
/// day instead of answering without its recent, rolled-up or compacted
/// windows, or failing on a short value.
const FORMAT_VERSION: &[u8] = b"5";

/// The versions this build reads.
const READABLE_VERSIONS: [&[u8]; 5] = [b"1", b"2", b"3", b"4", b"5"];

/// A day environment, shared by the writer and readers of this process.
pub(super) type Day = Arc<DayEnv>;

/// Days open in this process, by canonical path.
static OPEN_DAYS: LazyLock<Mutex<HashMap<PathBuf, Weak<DayEnv>>>> = LazyLock::new(Mutex::default);

/// One day's environment and its databases.
pub(super) struct DayEnv {
    /// `YYYY-MM-DD`.
    pub name: String,
    /// The day's directory.
    pub path: PathBuf,
    /// Private: every transaction must go through [`DayEnv::read`] or
    /// [`DayEnv::write_txn`] so that [`DayEnv::resize`] can exclude them.
    env: Env,
    read_only: bool,
    /// Held shared by every transaction of this process on `env`, exclusively
    /// by a resize: LMDB forbids resizing while any of them is active.
    txns: RwLock<()>,
    /// Windows by series, field, resolution and start: what queries read by
    /// series. Filled from `recent` by compaction before format version 5;
    /// since, read only.
    pub windows: Database<Bytes, Bytes>,
    /// The run slots `run.0` to `run.127` ([`super::runs`]): windows keyed as
    /// in `windows`, each slot a sorted run written by appending. Empty in
    /// a day before version 5 opened read-only.
    pub runs: Vec<Database<Bytes, Bytes>>,
    /// `recent.0` and `recent.1`: windows by resolution and start first (see
    /// [`put_recent_key`](super::codec::put_recent_key)). Batches write to the
    /// active one ([`RecentState`]); a compaction freezes it, makes the other
    /// active, and appends the frozen one to a new run in slices. Readers
    /// merge them with the runs and `windows`. `None` only in a version 1 day opened read-only.
    pub recent: Option<[Database<Bytes, Bytes>; 2]>,
    pub latest: Database<Bytes, Bytes>,
    pub applied: Database<Bytes, Bytes>,
    pub meta: Database<Bytes, Bytes>,
    /// The coarse resolutions this day derives from fine ones (fixed when
    /// the day was created; none in days of format version 1 and 2).
    pub rollups: Vec<Rollup>,
    /// Whether windows of one sample are written in their short form
    /// (format version 4). Readers take both forms from any day.
    pub short_values: bool,
}

/// Opens an environment; the only `unsafe` of opening.
#[allow(unsafe_code)]
fn open_env(path: &Path, map_bytes: usize, read_only: bool) -> heed::Result<Env> {
    let mut options = EnvOpenOptions::new();
    options
        .map_size(map_bytes)
        .max_dbs(u32::try_from(6 + RUN_SLOTS).unwrap_or(u32::MAX));
    // SAFETY: heed's conditions for opening: the file lives on a local
    // filesystem (documented: no NFS for the data dir); this process opens the
    // path once (callers go through the OPEN_DAYS registry, and heed itself
    // rejects a second open); the map is only touched through heed
    // transactions, and resizes exclude them (see `DayEnv::resize`).
    // READ_ONLY only removes abilities.
    unsafe {
        if read_only {
            options.flags(EnvFlags::READ_ONLY);
        }
        options.open(path)
    }
}

/// What a day records when it is created.
pub(super) struct Birth<'a> {
    /// RFC 3339, `meta` `created_at`.
    pub created_at: &'a str,
    /// The day's rollups ([`rollup::plan`] of the resolutions written).
    pub rollups: &'a [Rollup],
}

/// Opens (creating if needed) the day `name` under `dir` for writing, with
/// `map_bytes` as the initial map; a new day records `birth` in `meta`.
/// Returns the environment this process already has open, if any.
pub(super) fn open_for_write(
    dir: &Path,
    name: &str,
    map_bytes: usize,
    birth: &Birth<'_>,
) -> Result<Day, StoreError> {
    let path = dir.join(name);
    std::fs::create_dir_all(&path).map_err(io(&path))?;
    let day = registered(&path, name, true, |path| {
        DayEnv::create(path, name, map_bytes, birth).map(Some)
    })?;
    // `create` always returns a day; `None` only comes from read-only opens.
    day.ok_or_else(|| corrupt(name, "environment vanished while opening"))
}

/// Opens the existing day `name` under `dir` read-only, or returns the
/// environment this process already has open (the writer's, if it lives
/// here). `Ok(None)`: the day lacks the store's databases.
pub(super) fn open_for_read(dir: &Path, name: &str) -> Result<Option<Day>, StoreError> {
    registered(&dir.join(name), name, false, |path| {
        DayEnv::open_read_only(path, name)
    })
}

/// Looks the day up in [`OPEN_DAYS`], else opens it with `open` and registers it.
fn registered(
    path: &Path,
    name: &str,
    write: bool,
    open: impl FnOnce(PathBuf) -> Result<Option<Day>, StoreError>,
) -> Result<Option<Day>, StoreError> {
    let canonical = std::fs::canonicalize(path).map_err(io(path))?;
    let mut days = OPEN_DAYS.lock().unwrap_or_else(PoisonError::into_inner);
    days.retain(|_, day| day.strong_count() > 0);
    if let Some(day) = days.get(&canonical).and_then(Weak::upgrade) {
        if day.read_only && write {
            return Err(StoreError::OpenReadOnly {
                day: name.to_owned(),
            });
        }
        return Ok(Some(day));
    }
    let day = open(path.to_owned())?;
    if let Some(day) = &day {
        days.insert(canonical, Arc::downgrade(day));
    }
    Ok(day)
}

/// Opens the environment, waiting once for a close in progress: the last
/// handle of a day dropped on another thread releases heed's path only when
/// LMDB has closed it.
fn open_env_waiting(
    path: &Path,
    name: &str,
    map_bytes: usize,
    read_only: bool,
) -> Result<Env, StoreError> {
    match open_env(path, map_bytes, read_only) {
        Err(heed::Error::EnvAlreadyOpened) => {
            let canonical = std::fs::canonicalize(path).map_err(io(path))?;
            if let Some(closing) = heed::env_closing_event(canonical) {
                closing.wait_timeout(Duration::from_secs(10));
            }
            open_env(path, map_bytes, read_only).map_err(lmdb(name))
        }
        other => other.map_err(lmdb(name)),
    }
}

impl DayEnv {
    /// Opens (creating if needed) a day for writing.
    fn create(
        path: PathBuf,
        name: &str,
        map_bytes: usize,
        birth: &Birth<'_>,
    ) -> Result<Day, StoreError> {
        let existing = std::fs::metadata(path.join("data.mdb"))
            .map(|m| m.len())
            .unwrap_or(0);
        // A grown day must reopen at its grown size, not start full again.
        let map = map_bytes.max(
            usize::try_from(existing)
                .unwrap_or(usize::MAX)
                .next_power_of_two(),
        );
        let env = open_env_waiting(&path, name, map, false)?;
        let err = lmdb(name);
        let mut wtxn = env.write_txn().map_err(&err)?;
        let mut db = |n: &str| {
            env.create_database::<Bytes, Bytes>(&mut wtxn, Some(n))
                .map_err(&err)
        };
        let (windows, recent, latest, applied, meta) = (
            db("windows")?,
            [db("recent.0")?, db("recent.1")?],
            db("latest")?,
            db("applied")?,
            db("meta")?,
        );
        let runs = (0..RUN_SLOTS)
            .map(|i| db(&slot_name(i)))
            .collect::<Result<Vec<_>, _>>()?;
        match meta.get(&wtxn, b"format_version").map_err(&err)? {
            None => {
                meta.put(&mut wtxn, rollup::META_KEY, &rollup::encode(birth.rollups))
                    .map_err(&err)?;
            }
            // An older day now has its `recent` databases (version 1) and
            // its runs, and gets short values from now on.
            Some(v) => check_version(name, v)?,
        }
        meta.put(&mut wtxn, b"format_version", FORMAT_VERSION)
            .map_err(&err)?;
        if meta.get(&wtxn, b"created_at").map_err(&err)?.is_none() {
            meta.put(&mut wtxn, b"created_at", birth.created_at.as_bytes())
                .map_err(&err)?;
        }
        let rollups = read_rollups(name, meta, &wtxn)?;
        wtxn.commit().map_err(&err)?;
        let mut day = DayEnv::new(
            name,
            path,
            env,
            false,
            Some(recent),
            [windows, latest, applied, meta],
            rollups,
        );
        day.runs = runs;
        day.short_values = true;
        Ok(Arc::new(day))
    }

    /// Opens an existing day with `MDB_RDONLY`: it never writes the data file,
    /// and LMDB readers never block the writer of another process.
    fn open_read_only(path: PathBuf, name: &str) -> Result<Option<Day>, StoreError> {
        let file = path.join("data.mdb");
        let size = std::fs::metadata(&file).map_err(io(&file))?.len();
        // Room to grow before MDB_MAP_RESIZED (handled anyway, see `begin`).
        let map = usize::try_from(size)
            .unwrap_or(usize::MAX)
            .max(1 << 20)
            .next_power_of_two();
        let env = open_env_waiting(&path, name, map, true)?;
        let err = lmdb(name);
        let rtxn = env.read_txn().map_err(&err)?;
        let db = |n: &str| {
            env.open_database::<Bytes, Bytes>(&rtxn, Some(n))
                .map_err(&err)
        };
        let recent = match (db("recent.0")?, db("recent.1")?) {
            (Some(a), Some(b)) => Some([a, b]),
            _ => None,
        };
        let (Some(windows), Some(latest), Some(applied), Some(meta)) =
            (db("windows")?, db("latest")?, db("applied")?, db("meta")?)
        else {
            tracing::warn!(day = name, "skipping a day without the store's databases");
            return Ok(None);
        };
        if let Some(v) = meta.get(&rtxn, b"format_version").map_err(&err)? {
            check_version(name, v)?;
        }
        let rollups = read_rollups(name, meta, &rtxn)?;
        // The slots there are, in order (a day gets them all when it
        // becomes version 5; none before).
        let mut runs = Vec::new();
        for i in 0..RUN_SLOTS {
            match db(&slot_name(i))? {
                Some(run) => runs.push(run),
                None => break,
            }
        }
        // Commit, not drop: aborting the transaction that opened the handles
        // closes them, and later reads fail with EINVAL.
        rtxn.commit().map_err(&err)?;
        let mut day = DayEnv::new(
            name,
            path,
            env,
            true,
            recent,
            [windows, latest, applied, meta],
            rollups,
        );
        day.runs = runs;
        Ok(Some(Arc::new(day)))
    }

    fn new(
        name: &str,
        path: PathBuf,
        env: Env,
        read_only: bool,
        recent: Option<[Database<Bytes, Bytes>; 2]>,
        dbs: [Database<Bytes, Bytes>; 4],
        rollups: Vec<Rollup>,
    ) -> Self {
        let [windows, latest, applied, meta] = dbs;
        DayEnv {
            name: name.to_owned(),
            path,
            env,
            read_only,
            txns: RwLock::new(()),
            windows,
            runs: Vec::new(),
            recent,
            latest,
            applied,
            meta,
            rollups,
            short_values: false,
        }
    }

    fn shared(&self) -> RwLockReadGuard<'_, ()> {
        self.txns.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `begin` holding the transaction guard; on `MDB_MAP_RESIZED` (another
    /// process grew the file past this process's map) adopts the recorded map
    /// size and tries once more. The guard must outlive what `begin` returns.
    fn begin<'a, T>(
        &'a self,
        begin: impl Fn(&'a Env) -> heed::Result<T>,
    ) -> Result<(RwLockReadGuard<'a, ()>, T), StoreError> {
        let shared = self.shared();
        match begin(&self.env) {
            Err(heed::Error::Mdb(MdbError::MapResized)) => {
                drop(shared);
                self.resize(0)?;
                let shared = self.shared();
                begin(&self.env)
                    .map(|t| (shared, t))
                    .map_err(lmdb(&self.name))
            }
            other => other.map(|t| (shared, t)).map_err(lmdb(&self.name)),
        }
    }

    /// Runs `f` in a read transaction (short: it blocks resizes of this day).
    pub fn read<T>(
        &self,
        f: impl FnOnce(&RoTxn<'_, WithTls>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let (_shared, rtxn) = self.begin(Env::read_txn)?;
        f(&rtxn)
    }

    /// Begins the write transaction.
    pub fn write_txn(&self) -> Result<WriteTxn<'_>, StoreError> {
        let (shared, txn) = self.begin(Env::write_txn)?;
        Ok(WriteTxn {
            txn,
            _shared: shared,
        })
    }

    /// Sets the map size (0: the size the last writer recorded); the only
    /// `unsafe` of resizing.
    #[allow(unsafe_code)]
    pub fn resize(&self, new_bytes: usize) -> Result<(), StoreError> {
        let _exclusive = self.txns.write().unwrap_or_else(PoisonError::into_inner);
        // SAFETY: mdb_env_set_mapsize requires that no transaction of this
        // process is active on the environment. `env` is private to this type,
        // every transaction on it is begun by `begin` and holds `txns` shared
        // for its whole life (`read`, `WriteTxn`, `copy_to`), and we hold
        // `txns` exclusively.
        unsafe { self.env.resize(new_bytes) }.map_err(lmdb(&self.name))
    }

    /// A consistent, compacted copy of the environment into `file`.
    pub fn copy_to(&self, file: &Path) -> Result<(), StoreError> {
        self.begin(|env| env.copy_to_path(file, CompactionOption::Enabled))
            .map(drop)
    }

    /// `meta` `messages_applied`: messages applied in this day.
    pub fn messages_applied(&self, txn: &RoTxn<'_>) -> Result<u64, StoreError> {
        match self
            .meta
            .get(txn, b"messages_applied")
            .map_err(lmdb(&self.name))?
        {
            Some(b) => b
                .try_into()
                .map(u64::from_le_bytes)
                .map_err(|_| corrupt(&self.name, "meta messages_applied")),
            None => Ok(0),
        }
    }

    /// Which `recent` database batches write to, and how far a compaction
    /// of the other has got.
    pub fn recent_state(&self, txn: &RoTxn<'_>) -> Result<RecentState, StoreError> {
        let err = lmdb(&self.name);
        let active = match self.meta.get(txn, RECENT_ACTIVE).map_err(&err)? {
            None | Some(b"0") => 0,
            Some(b"1") => 1,
            Some(_) => return Err(corrupt(&self.name, "meta recent_active")),
        };
        let merged_below = self
            .meta
            .get(txn, COMPACTED_BELOW)
            .map_err(&err)?
            .map(<[u8]>::to_vec);
        Ok(RecentState {
            active,
            merged_below,
        })
    }

    /// Both `recent` databases of a day this process writes to (every such
    /// day has them: opening for writing creates them).
    pub fn recent_dbs(&self) -> Result<[Database<Bytes, Bytes>; 2], StoreError> {
        self.recent
            .ok_or_else(|| corrupt(&self.name, "no recent database in a day open for writing"))
    }

    /// Run slot `slot` of a day this process writes to (every such day has
    /// them all: opening for writing creates them).
    pub fn run_db(&self, slot: u8) -> Result<Database<Bytes, Bytes>, StoreError> {
        self.runs
            .get(usize::from(slot))
            .copied()
            .ok_or_else(|| corrupt(&self.name, format!("no run slot {slot}")))
    }

    /// [`DayEnv::recent_state`] and the windows in the active `recent`
    /// database, read in one transaction (what the writer checks after each
    /// batch to start or resume a compaction).
    pub fn recent_status(&self) -> Result<(RecentState, u64), StoreError> {
        self.read(|rtxn| {
            let state = self.recent_state(rtxn)?;
            let active = match self.recent {
                Some(dbs) => dbs[state.active].len(rtxn).map_err(lmdb(&self.name))?,
                None => 0,
            };
            Ok((state, active))
        })
    }

    /// The current map size of this process's view. Under the transaction
    /// guard, like every use of `env`: a resize rewrites what this reads.
    pub fn map_bytes(&self) -> usize {
        let _shared = self.shared();
        self.env.info().map_size
    }

    /// LMDB's page size for this environment. Under the transaction guard:
    /// `mdb_env_stat` reads the meta page through the map, which a resize
    /// unmaps and maps again.
    pub fn page_size(&self) -> u32 {
        let _shared = self.shared();
        self.env.stat().page_size
    }

    /// Size of `data.mdb` on disk.
    pub fn file_bytes(&self) -> Result<u64, StoreError> {
        let file = self.path.join("data.mdb");
        Ok(std::fs::metadata(&file).map_err(io(&file))?.len())
    }

    /// Closes the environment if this is its last handle and waits until LMDB
    /// released it; `false` if a reader of this process still holds it (it
    /// then closes when that reader drops it).
    pub fn close(day: Day) -> bool {
        match Arc::try_unwrap(day) {
            Ok(day) => {
                let closed = day.env.clone().prepare_for_closing();
                drop(day);
                closed.wait();
                true
            }
            Err(_) => false,
        }
    }
}

/// `meta` key: `0` or `1`, the `recent` database batches write to.
pub(super) const RECENT_ACTIVE: &[u8] = b"recent_active";

/// `meta` key, present while a compaction runs: the window key up to which
/// (exclusive) the frozen `recent` database is in its run already (or, for
/// a compaction a build before format version 5 began, in `windows`).
pub(super) const COMPACTED_BELOW: &[u8] = b"compacted_below";

/// See [`DayEnv::recent_state`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct RecentState {
    /// Index of the `recent` database batches write to.
    pub active: usize,
    /// While a compaction runs: the other database's windows with keys below
    /// this are in the compaction's run already, and readers skip them there.
    pub merged_below: Option<Vec<u8>>,
}

impl RecentState {
    /// The window keys of `recent` database `i` that readers take: from
    /// this key on (all for the active one).
    pub fn floor(&self, i: usize) -> &[u8] {
        match &self.merged_below {
            Some(k) if i != self.active => k,
            _ => &[],
        }
    }
}

/// A write transaction holding the resize guard; the transaction drops
/// (aborts) before the guard.
pub(super) struct WriteTxn<'a> {
    pub txn: RwTxn<'a>,
    _shared: RwLockReadGuard<'a, ()>,
}

impl WriteTxn<'_> {
    /// Commits.
    pub fn commit(self, day: &str) -> Result<(), StoreError> {
        let WriteTxn { txn, _shared } = self;
        txn.commit().map_err(lmdb(day))
    }
}

fn check_version(day: &str, v: &[u8]) -> Result<(), StoreError> {
    if READABLE_VERSIONS.contains(&v) {
        return Ok(());
    }
    let found = String::from_utf8_lossy(v);
    Err(corrupt(
        day,
        format!("meta format_version {found:?} (this build reads 1 to 5)"),
    ))
}

/// The day's `meta` `rollups` (none if absent: days before them).
fn read_rollups(
    day: &str,
    meta: Database<Bytes, Bytes>,
    txn: &RoTxn<'_>,
) -> Result<Vec<Rollup>, StoreError> {
    match meta.get(txn, rollup::META_KEY).map_err(lmdb(day))? {
        None => Ok(Vec::new()),
        Some(bytes) => rollup::decode(bytes).ok_or_else(|| {
            corrupt(
                day,
                format!("meta rollups {:?}", String::from_utf8_lossy(bytes)),
            )
        }),
    }
}
