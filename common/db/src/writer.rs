//! Write transactions ([`Database::begin_write`]), and SQLite's group
//! commit.
//!
//! SQLite has one writer at a time. A process's writers take turns in an
//! async mutex before `BEGIN IMMEDIATE`, so that the lock passes straight
//! to the next writer instead of being polled for by SQLite's busy
//! handler, which sleeps 1, 2, 5, 10, … ms between tries and leaves the
//! lock idle meanwhile (issue #14: 300 small paths took 1.38 s with it,
//! 1.17 s without).
//!
//! # Group commit
//!
//! A transaction that finishes while other writers wait for their turn
//! does not commit: it leaves its work in the open transaction, passes the
//! turn on, and waits for the group's `COMMIT`. The next writer works in a
//! savepoint of the same transaction (so that its failure undoes only its
//! own work), and so on, until a writer finishes with nobody waiting, or
//! the group has [`MAX_GROUP_MEMBERS`] members or is
//! [`MAX_GROUP_AGE`] old: that one commits for all, and each member's
//! `commit` returns the group's outcome. Nobody is told "committed" before
//! the `COMMIT` that wrote their work, so durability is that of one
//! transaction each; what is shared is the `COMMIT`'s sync and the turn's
//! hand-overs. A push of many small paths is two write transactions per
//! path, and committing each alone kept the write lock busy (issue #14).
//!
//! The members run one after another on one connection, so the group is
//! the serial order of its members: a member sees the earlier members'
//! writes exactly as it would after their commits. Not so its caller, if
//! the member ends without committing: what it read is not committed yet,
//! and other connections do not see it. So only the transactions whose
//! callers then act on nothing they read share groups
//! ([`Database::begin_groupable_write`]: recording an upload, storing a
//! small NAR, the two of every small path); any other
//! ([`Database::begin_write`]) commits an open group before it begins.
//! (Found by two `nix copy`s of one path: the second's narinfo found the
//! staged file claimed by the first, a parked member, and looked up that
//! claim through another connection.)
//!
//! A group that its waiters abandoned (a waiting request cancelled, say)
//! would hold the write lock with nobody to commit it: each group has a
//! watchdog task that commits it after [`STRANDED_GROUP_AFTER`]. Nor does
//! a cancelled member take the others down: the `COMMIT` of a group with
//! parked members runs in a task of its own, and a member cancelled during
//! its `SAVEPOINT` or `RELEASE` puts the group back for the next
//! ([`member_statement`]). Any failure the parked members share is
//! [`DbError::GroupCommit`], which is transient.
//!
//! PostgreSQL has concurrent writers and commits each transaction alone.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::{Any, AnyConnection, Transaction};
use tokio::sync::{oneshot, Mutex, OwnedMutexGuard};

use super::error::{query_error, DbError, Result};
use super::{Backend, Database, SQLITE_BUSY_TIMEOUT};

/// The `tracing` target of the event each write transaction begins with
/// (at trace level): what lets a test count a path's transactions.
pub const WRITE_TRANSACTION_TARGET: &str = "larder::db::write_transaction";

/// At most this many transactions commit together. Each member's commit
/// waits for the members after it, so the bound keeps the first one's wait
/// short.
const MAX_GROUP_MEMBERS: usize = 32;

/// A group this old commits with its next member, waiters or not.
const MAX_GROUP_AGE: Duration = Duration::from_millis(20);

/// A group still open this long after its first member parked has been
/// abandoned by its waiters: its watchdog commits it.
const STRANDED_GROUP_AFTER: Duration = Duration::from_millis(200);

/// Every member after the first works in a savepoint, released before the
/// next member begins, so one name serves all.
const BEGIN_MEMBER: &str = "SAVEPOINT larder_group_member";
const END_MEMBER: &str = "RELEASE larder_group_member";
const UNDO_MEMBER: &str = "ROLLBACK TO larder_group_member";

/// What a parked member is told: the group's `COMMIT` succeeded, or its
/// error.
type GroupOutcome = std::result::Result<(), Arc<sqlx::Error>>;

/// SQLite's writer turn and the group it holds, shared by every clone of a
/// [`Database`].
#[derive(Default)]
pub(crate) struct SqliteWriter {
    /// Whoever holds this holds the turn, and with it the open group, if
    /// any.
    turn: Arc<Mutex<Option<OpenGroup>>>,
    /// Writers waiting for the turn: a transaction that finishes while any
    /// wait leaves the group open for them.
    waiting: AtomicUsize,
    /// Numbers the groups, for the watchdog to know its own.
    groups: AtomicU64,
}

/// Counts a writer in [`SqliteWriter::waiting`] while it lives: a writer
/// whose wait is cancelled must not stay counted, or every transaction
/// would park for it.
struct Waiting<'a>(&'a SqliteWriter);

impl<'a> Waiting<'a> {
    fn on(writer: &'a SqliteWriter) -> Self {
        writer.waiting.fetch_add(1, Ordering::SeqCst);
        Self(writer)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::SeqCst);
    }
}

/// An open transaction and the members that finished their work in it.
struct OpenGroup {
    id: u64,
    transaction: Transaction<'static, Any>,
    /// One sender per parked member, told the outcome of the `COMMIT`.
    parked: Vec<oneshot::Sender<GroupOutcome>>,
    began: Instant,
}

impl OpenGroup {
    fn new(id: u64, transaction: Transaction<'static, Any>) -> Self {
        Self {
            id,
            transaction,
            parked: Vec::new(),
            began: Instant::now(),
        }
    }

    /// Commits the group and tells every parked member the outcome.
    async fn commit(self) -> GroupOutcome {
        let outcome = self.transaction.commit().await.map_err(Arc::new);
        for member in self.parked {
            let _ = member.send(outcome.clone());
        }
        outcome
    }

    /// Gives the group up (it is rolled back as it is dropped) because of
    /// `error`, which every parked member is told.
    fn fail(self, error: sqlx::Error) -> Arc<sqlx::Error> {
        let error = Arc::new(error);
        for member in self.parked {
            let _ = member.send(Err(Arc::clone(&error)));
        }
        error
    }
}

/// The error of a commit: the driver's own when nobody else shares it.
fn commit_error(context: &'static str, source: Arc<sqlx::Error>) -> DbError {
    match Arc::try_unwrap(source) {
        Ok(source) => DbError::Query { context, source },
        Err(source) => DbError::GroupCommit { context, source },
    }
}

impl Database {
    /// Starts a transaction that will write. On SQLite it takes the write
    /// lock at once (`BEGIN IMMEDIATE`): a deferred transaction that reads
    /// first and writes later can fail with SQLITE_BUSY at the write,
    /// without waiting, when another connection wrote in between.
    ///
    /// It never shares a group: an open one is committed before it begins,
    /// so whatever it reads is committed, and a caller may act on it
    /// through other connections even when the transaction ends without
    /// committing (see [`Database::begin_groupable_write`]).
    pub(crate) async fn begin_write(&self) -> Result<WriteTransaction> {
        self.begin(Grouping::Alone).await
    }

    /// [`Database::begin_write`] for a transaction that may join, and
    /// leave open, a group commit (see the module documentation). Only
    /// for a transaction whose caller, when it ends without committing,
    /// does not act on what it read: it may have read earlier members'
    /// writes, which are not committed until the group is.
    pub(crate) async fn begin_groupable_write(&self) -> Result<WriteTransaction> {
        self.begin(Grouping::Shared).await
    }

    async fn begin(&self, grouping: Grouping) -> Result<WriteTransaction> {
        tracing::trace!(target: WRITE_TRANSACTION_TARGET, "beginning a write transaction");
        if self.backend == Backend::Postgres {
            let transaction = self
                .pool
                .begin()
                .await
                .map_err(query_error("starting a transaction"))?;
            return Ok(WriteTransaction::alone(transaction));
        }
        let writer = &self.sqlite_writer;
        let turn = {
            let _waiting = Waiting::on(writer);
            tokio::time::timeout(SQLITE_BUSY_TIMEOUT, Arc::clone(&writer.turn).lock_owned()).await
        };
        let Ok(mut guard) = turn else {
            // Past the busy timeout a writer goes on without its turn and
            // meets SQLite's own wait (and its error), as it would without
            // turns: a turn never waits forever.
            return Ok(WriteTransaction::alone(self.begin_immediate().await?));
        };
        let (group, savepoint) = match (guard.take(), grouping) {
            (Some(group), Grouping::Shared) => {
                match member_statement(&mut guard, group, BEGIN_MEMBER).await {
                    Ok(group) => (group, true),
                    Err((group, error)) => {
                        return Err(commit_error("joining a group commit", group.fail(error)));
                    }
                }
            }
            (open, _) => {
                if let Some(group) = open {
                    // Its members are told the outcome; a task, so that the
                    // `COMMIT` runs to its end even if this caller is
                    // cancelled.
                    if let Ok(Err(error)) = tokio::spawn(group.commit()).await {
                        tracing::warn!(%error, "a group commit failed");
                    }
                }
                let id = writer.groups.fetch_add(1, Ordering::Relaxed);
                (OpenGroup::new(id, self.begin_immediate().await?), false)
            }
        };
        Ok(WriteTransaction {
            group: Some(group),
            turn: Some(Turn {
                guard,
                writer: Arc::clone(writer),
                savepoint,
                grouping,
            }),
        })
    }

    /// A SQLite transaction holding the write lock from its start.
    async fn begin_immediate(&self) -> Result<Transaction<'static, Any>> {
        self.pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(query_error("starting a transaction"))
    }
}

/// Whether a SQLite write transaction may share a group commit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Grouping {
    /// Never: an open group is committed before it begins, and it commits
    /// alone.
    Alone,
    /// It may join an open group and, finishing while others wait, leave
    /// it open for them.
    Shared,
}

/// A write transaction from [`Database::begin_write`]. Dropped without
/// [`commit`](Self::commit), it undoes its own work and nothing else.
pub(crate) struct WriteTransaction {
    /// The transaction it works in; taken when it ends.
    group: Option<OpenGroup>,
    /// SQLite's writer turn, held until it ends; `None` on PostgreSQL and
    /// for a SQLite writer that went on without its turn.
    turn: Option<Turn>,
}

struct Turn {
    guard: OwnedMutexGuard<Option<OpenGroup>>,
    writer: Arc<SqliteWriter>,
    /// Whether it works in a savepoint: it joined a group whose earlier
    /// members are parked in it.
    savepoint: bool,
    grouping: Grouping,
}

impl WriteTransaction {
    /// A transaction that shares no group and holds no turn: PostgreSQL's,
    /// or a SQLite writer's that went on without its turn.
    fn alone(transaction: Transaction<'static, Any>) -> Self {
        Self {
            group: Some(OpenGroup::new(0, transaction)),
            turn: None,
        }
    }

    /// Commits, or, on SQLite while other writers wait, joins the group
    /// commit: returns once the `COMMIT` that holds this transaction's
    /// work has succeeded or failed. `context` says what was committed.
    pub(crate) async fn commit(mut self, context: &'static str) -> Result<()> {
        let mut group = self
            .group
            .take()
            .expect("a transaction's group is taken when it ends");
        let Some(mut turn) = self.turn.take() else {
            return group
                .commit()
                .await
                .map_err(|error| commit_error(context, error));
        };
        if turn.savepoint {
            group = match member_statement(&mut turn.guard, group, END_MEMBER).await {
                Ok(group) => group,
                Err((group, error)) => return Err(commit_error(context, group.fail(error))),
            };
        }
        if turn.grouping == Grouping::Shared && turn.writer.keeps_open(&group) {
            let (told, outcome) = oneshot::channel();
            if group.parked.is_empty() {
                turn.writer.watch_for_stranding(group.id);
            }
            group.parked.push(told);
            let mut guard = turn.guard;
            *guard = Some(group);
            drop(guard);
            return match outcome.await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(source)) => Err(DbError::GroupCommit { context, source }),
                Err(_) => Err(DbError::GroupCommit {
                    context,
                    source: Arc::new(sqlx::Error::Protocol(
                        "the group commit was abandoned".to_owned(),
                    )),
                }),
            };
        }
        let committed = if group.parked.is_empty() {
            group.commit().await
        } else {
            // Parked members wait on this `COMMIT`: it runs to its end, and
            // the turn passes on after it, even if this caller is cancelled
            // meanwhile.
            let guard = turn.guard;
            let committing = tokio::spawn(async move {
                let committed = group.commit().await;
                drop(guard);
                committed
            });
            committing.await.unwrap_or_else(|error| {
                Err(Arc::new(sqlx::Error::Protocol(format!(
                    "the group commit's task failed: {error}"
                ))))
            })
        };
        committed.map_err(|error| commit_error(context, error))
    }
}

impl SqliteWriter {
    /// Whether a member finishing now leaves `group` open for the next.
    fn keeps_open(&self, group: &OpenGroup) -> bool {
        self.waiting.load(Ordering::SeqCst) > 0
            && group.parked.len() + 1 < MAX_GROUP_MEMBERS
            && group.began.elapsed() < MAX_GROUP_AGE
    }

    /// Commits group `id` after [`STRANDED_GROUP_AFTER`] if it is still
    /// open then, with nobody working in it (see the module
    /// documentation).
    fn watch_for_stranding(self: &Arc<Self>, id: u64) {
        let writer = Arc::clone(self);
        tokio::spawn(async move {
            tokio::time::sleep(STRANDED_GROUP_AFTER).await;
            let mut guard = Arc::clone(&writer.turn).lock_owned().await;
            if guard.as_ref().is_some_and(|group| group.id == id) {
                if let Some(group) = guard.take() {
                    tracing::warn!("committing a group commit its waiters abandoned");
                    let _ = group.commit().await;
                }
            }
        });
    }

    /// After a member's savepoint was undone: leaves the group open for a
    /// waiting writer, or commits it.
    async fn hand_on(&self, group: OpenGroup, mut guard: OwnedMutexGuard<Option<OpenGroup>>) {
        if self.keeps_open(&group) {
            *guard = Some(group);
        } else if let Err(error) = group.commit().await {
            tracing::warn!(%error, "a group commit failed");
        }
    }
}

/// Runs one of a member's own statements (`SAVEPOINT`, `RELEASE`) on a
/// group others are parked in. Should the caller be cancelled meanwhile,
/// the group goes back to the turn's slot rather than being rolled back
/// with the parked members' work (which would fail their pushes for
/// another's disconnect): a savepoint left open there is harmless (the
/// next member's nests in it, and the group's `COMMIT` ends both), and the
/// next member or the group's watchdog commits it.
async fn member_statement(
    slot: &mut OwnedMutexGuard<Option<OpenGroup>>,
    group: OpenGroup,
    statement: &'static str,
) -> std::result::Result<OpenGroup, (OpenGroup, sqlx::Error)> {
    struct PutBack<'a> {
        slot: &'a mut Option<OpenGroup>,
        group: Option<OpenGroup>,
    }
    impl Drop for PutBack<'_> {
        fn drop(&mut self) {
            if let Some(group) = self.group.take() {
                *self.slot = Some(group);
            }
        }
    }
    let mut held = PutBack {
        slot,
        group: Some(group),
    };
    let group = held.group.as_mut().expect("held until the statement ends");
    let outcome = sqlx::query(statement)
        .execute(&mut *group.transaction)
        .await;
    let group = held.group.take().expect("held until the statement ends");
    match outcome {
        Ok(_) => Ok(group),
        Err(error) => Err((group, error)),
    }
}

/// Undoes the work of a member dropped without committing, then carries
/// its group on, holding the turn throughout.
async fn abandon_member(mut group: OpenGroup, turn: Turn) {
    let mut undone = sqlx::query(UNDO_MEMBER)
        .execute(&mut *group.transaction)
        .await;
    if undone.is_ok() {
        undone = sqlx::query(END_MEMBER)
            .execute(&mut *group.transaction)
            .await;
    }
    match undone {
        Ok(_) => turn.writer.hand_on(group, turn.guard).await,
        Err(error) => {
            group.fail(error);
        }
    }
}

impl Drop for WriteTransaction {
    fn drop(&mut self) {
        let Some(group) = self.group.take() else {
            return;
        };
        match self.turn.take() {
            Some(turn) if turn.savepoint => {
                // Others' work is in the transaction: undoing only this
                // member's takes statements, so a task does it.
                match tokio::runtime::Handle::try_current() {
                    Ok(runtime) => {
                        runtime.spawn(abandon_member(group, turn));
                    }
                    Err(_) => {
                        group.fail(sqlx::Error::Protocol(
                            "a member of a group commit was dropped outside a runtime".to_owned(),
                        ));
                    }
                }
            }
            // Nobody else's work is in it: sqlx rolls the transaction back
            // as it is dropped, before the turn passes on.
            turn => {
                drop(group);
                drop(turn);
            }
        }
    }
}

impl std::ops::Deref for WriteTransaction {
    type Target = AnyConnection;

    fn deref(&self) -> &AnyConnection {
        let group = self
            .group
            .as_ref()
            .expect("a transaction's group is taken when it ends");
        &group.transaction
    }
}

impl std::ops::DerefMut for WriteTransaction {
    fn deref_mut(&mut self) -> &mut AnyConnection {
        let group = self
            .group
            .as_mut()
            .expect("a transaction's group is taken when it ends");
        &mut group.transaction
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A SQLite database in a temporary file with one table, `t (k)`.
    async fn sqlite() -> (Database, tempfile::TempDir) {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let url = format!("sqlite:{}", dir.path().join("t.sqlite").display());
        let db = Database::connect(&url).await.expect("connecting");
        sqlx::raw_sql("CREATE TABLE t (k INTEGER PRIMARY KEY)")
            .execute(db.pool())
            .await
            .expect("creating the table");
        (db, dir)
    }

    async fn insert(tx: &mut WriteTransaction, k: i64) -> std::result::Result<(), sqlx::Error> {
        sqlx::query("INSERT INTO t (k) VALUES ($1)")
            .bind(k)
            .execute(&mut **tx)
            .await
            .map(|_| ())
    }

    async fn keys(db: &Database) -> Vec<i64> {
        sqlx::query_scalar("SELECT k FROM t ORDER BY k")
            .fetch_all(db.pool())
            .await
            .expect("reading the table")
    }

    fn groups_begun(db: &Database) -> u64 {
        db.sqlite_writer.groups.load(Ordering::SeqCst)
    }

    /// Waits until `n` writers wait for the turn; fails after 10 s.
    async fn until_waiting(db: &Database, n: usize) {
        let waited = tokio::time::timeout(Duration::from_secs(10), async {
            while db.sqlite_writer.waiting.load(Ordering::SeqCst) != n {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
        .await;
        let now = db.sqlite_writer.waiting.load(Ordering::SeqCst);
        assert!(waited.is_ok(), "{now} writers wait for the turn, not {n}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_writers_commit_together_and_every_write_lands() {
        let (db, _dir) = sqlite().await;
        let writers: Vec<_> = (0..64)
            .map(|k| {
                let db = db.clone();
                tokio::spawn(async move {
                    let mut tx = db.begin_groupable_write().await?;
                    insert(&mut tx, k).await.map_err(query_error("inserting"))?;
                    tx.commit("committing a key").await
                })
            })
            .collect();
        for writer in writers {
            writer.await.expect("a writer panicked").expect("a write");
        }
        assert_eq!(keys(&db).await, (0..64).collect::<Vec<_>>());
        let groups = groups_begun(&db);
        assert!(
            groups < 64,
            "64 writers waiting on each other began {groups} transactions"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_member_that_fails_undoes_only_its_own_work() {
        let (db, _dir) = sqlite().await;
        let mut first = db.begin_groupable_write().await.expect("the first writer");
        insert(&mut first, 1).await.expect("inserting 1");
        let second = tokio::spawn({
            let db = db.clone();
            async move {
                let mut tx = db.begin_groupable_write().await.expect("the second writer");
                assert!(tx.turn.as_ref().is_some_and(|turn| turn.savepoint));
                insert(&mut tx, 2).await.expect("inserting 2");
                // A key the first writer holds: this member fails, and is
                // dropped uncommitted.
                insert(&mut tx, 1).await.expect_err("1 is taken")
            }
        });
        until_waiting(&db, 1).await;
        // A writer waits, so the first parks in the group until the second
        // is done; its commit is the group's.
        first
            .commit("committing 1")
            .await
            .expect("the group commit");
        second.await.expect("the second writer panicked");
        assert_eq!(keys(&db).await, vec![1], "the failed member's 2 is undone");
        assert_eq!(groups_begun(&db), 1, "both ran in one transaction");

        // The turn is free again, and the next writer begins a group.
        let mut third = db.begin_groupable_write().await.expect("the third writer");
        insert(&mut third, 3).await.expect("inserting 3");
        third.commit("committing 3").await.expect("committing 3");
        assert_eq!(keys(&db).await, vec![1, 3]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_writer_that_shares_no_group_commits_the_open_one_first() {
        let (db, _dir) = sqlite().await;
        let mut first = db.begin_groupable_write().await.expect("a writer");
        insert(&mut first, 1).await.expect("inserting 1");
        let alone = tokio::spawn({
            let db = db.clone();
            async move {
                let mut tx = db.begin_write().await.expect("a writer alone");
                // What it can see, others can: the group it found is
                // committed. (The case that needs it: a `nix copy`'s
                // narinfo finds its staged file claimed by a group member,
                // then looks up that claim through another connection.)
                let seen = keys(&db).await;
                insert(&mut tx, 2).await.expect("inserting 2");
                tx.commit("committing 2").await.expect("committing 2");
                seen
            }
        });
        until_waiting(&db, 1).await;
        // The waiter shares no group, but the first cannot tell: it parks.
        first
            .commit("committing 1")
            .await
            .expect("the group commit");
        assert_eq!(alone.await.expect("the writer panicked"), vec![1]);
        assert_eq!(keys(&db).await, vec![1, 2]);
        assert_eq!(groups_begun(&db), 2, "the second began its own");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_group_whose_waiter_went_away_is_committed_by_its_watchdog() {
        let (db, _dir) = sqlite().await;
        let mut tx = db.begin_groupable_write().await.expect("a writer");
        insert(&mut tx, 1).await.expect("inserting 1");
        // A waiter that never takes its turn (as a cancelled request's
        // would, had it gone after this transaction decided to park).
        db.sqlite_writer.waiting.fetch_add(1, Ordering::SeqCst);
        let started = Instant::now();
        tokio::time::timeout(Duration::from_secs(5), tx.commit("committing 1"))
            .await
            .expect("the watchdog commits the group within 5 s")
            .expect("the watchdog's commit");
        assert!(started.elapsed() >= STRANDED_GROUP_AFTER);
        db.sqlite_writer.waiting.fetch_sub(1, Ordering::SeqCst);
        assert_eq!(keys(&db).await, vec![1]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_member_cancelled_in_its_own_statement_leaves_the_group_to_commit() {
        let (db, _dir) = sqlite().await;
        let mut first = db.begin_groupable_write().await.expect("a writer");
        insert(&mut first, 1).await.expect("inserting 1");
        // A waiter, so that the first parks in the group.
        db.sqlite_writer.waiting.fetch_add(1, Ordering::SeqCst);
        let parked = tokio::spawn(async move { first.commit("committing 1").await });
        let mut turn = loop {
            let turn = Arc::clone(&db.sqlite_writer.turn).lock_owned().await;
            if turn.is_some() {
                break turn;
            }
            drop(turn);
            tokio::time::sleep(Duration::from_millis(1)).await;
        };
        db.sqlite_writer.waiting.fetch_sub(1, Ordering::SeqCst);
        // A member's statement (a slow one here, where a real member's
        // is a `SAVEPOINT` or `RELEASE`) cancelled on the way, as a
        // request whose client went away.
        const SLOW: &str = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c \
                            WHERE x < 3000000) SELECT count(*) FROM c";
        let group = turn.take().expect("the parked group");
        let id = group.id;
        let cancelled = tokio::time::timeout(
            Duration::from_millis(10),
            member_statement(&mut turn, group, SLOW),
        )
        .await;
        assert!(cancelled.is_err(), "the slow statement finished in 10 ms");
        // The group is back, with the first's work in it, and is committed
        // (by its watchdog: nobody else comes).
        assert_eq!(turn.as_ref().map(|group| group.id), Some(id));
        drop(turn);
        let committed = tokio::time::timeout(Duration::from_secs(10), parked)
            .await
            .expect("the group commits within 10 s")
            .expect("the parked writer panicked");
        committed.expect("the group commit");
        assert_eq!(keys(&db).await, vec![1]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_cancelled_wait_for_the_turn_is_not_counted() {
        let (db, _dir) = sqlite().await;
        let holder = db.begin_groupable_write().await.expect("a writer");
        let waiter = tokio::spawn({
            let db = db.clone();
            async move { db.begin_groupable_write().await.map(|_| ()) }
        });
        until_waiting(&db, 1).await;
        waiter.abort();
        let _ = waiter.await;
        until_waiting(&db, 0).await;
        // Nobody waits, so the commit is the writer's own, at once.
        let started = Instant::now();
        holder.commit("committing nothing").await.expect("a commit");
        assert!(started.elapsed() < STRANDED_GROUP_AFTER);
    }
}
