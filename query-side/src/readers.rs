//! View readers of cluster mode: the Redis view for point reads, the SQL view on the read
//! replicas for lists and as the fallback when Redis is down.

use async_trait::async_trait;
use pcf_adapters::redis::{RedisConnection, RedisSettings};
use pcf_adapters::sql::read_user;
use pcf_domain::ports::{PortError, UserFilter, UserReader};
use pcf_domain::read_model::{
    email_bucket, redis_active_key, redis_bucket_tag, redis_user_key, user_bucket, REDIS_BUCKETS,
    SQL_VIEW,
};
use pcf_domain::{Email, UserView};
use redis::Script;
use sqlx::PgPool;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock};
use uuid::Uuid;

/// Reads several user documents of their buckets' active generations in one round trip:
/// ARGV[1] the key prefix, ARGV[2] the number of buckets, then the ids. KEYS[1] is an
/// active key of the bucket of the ids on a cluster (where the ids of a call share one).
static USERS_BY_ID: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local docs = {}
for i = 3, #ARGV do
  local id = ARGV[i]
  local tag = '{' .. ARGV[1] .. ':b' .. (tonumber(string.sub(id, -2), 16) % tonumber(ARGV[2])) .. '}'
  local g = redis.call('GET', tag .. ':active') or '1'
  docs[#docs + 1] = redis.call('GET', tag .. ':g' .. g .. ':user:' .. id) or false
end
return docs
"#,
    )
});

/// Follows the email index of the active generation to the user document, in one round
/// trip (one server: the email entry and the document are in different buckets). KEYS[1]
/// the email bucket's active key, ARGV[1] the email bucket's tag, ARGV[2] the email,
/// ARGV[3] the key prefix, ARGV[4] the number of buckets.
static USER_BY_EMAIL: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local g = redis.call('GET', KEYS[1]) or '1'
local id = redis.call('GET', ARGV[1] .. ':g' .. g .. ':email:' .. ARGV[2])
if not id then return false end
local tag = '{' .. ARGV[3] .. ':b' .. (tonumber(string.sub(id, -2), 16) % tonumber(ARGV[4])) .. '}'
local ug = redis.call('GET', tag .. ':active') or '1'
return redis.call('GET', tag .. ':g' .. ug .. ':user:' .. id)
"#,
    )
});

/// The id an email entry of the active generation names (a cluster's first step of a read
/// by email): KEYS[1] the email bucket's active key, ARGV[1] its tag, ARGV[2] the email.
static EMAIL_ENTRY: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local g = redis.call('GET', KEYS[1]) or '1'
return redis.call('GET', ARGV[1] .. ':g' .. g .. ':email:' .. ARGV[2])
"#,
    )
});

fn parse_doc(doc: Option<String>) -> Result<Option<UserView>, PortError> {
    doc.map(|d| serde_json::from_str(&d))
        .transpose()
        .map_err(|e| PortError::Internal(format!("user document: {e}")))
}

fn earlier_layout() -> PortError {
    PortError::Unavailable(
        "the Redis view is in an earlier version's layout: run `pcf projections rebuild users-redis`"
            .into(),
    )
}

/// The Redis user view.
#[derive(Clone)]
pub struct RedisUserReader {
    conn: RedisConnection,
    prefix: String,
    /// The active generation as last seen. A point read asks for the active pointer (of
    /// the user's bucket) and the document of this generation in one pipeline (two plain
    /// GETs of one slot, cheaper for Redis than a script), and reads again only when a
    /// rebuild has moved the pointer.
    generation: Arc<AtomicU64>,
    /// Whether the view's keys are of this version's layout (`Layout`).
    layout: Arc<std::sync::Mutex<Layout>>,
}

/// What a reader knows of the layout of the view's keys. Earlier versions kept the generation
/// state in `<prefix>:active` and the documents under `<prefix>:g<n>:`, which this version
/// does not read: until a rebuild writes the view in buckets (`pcf projections rebuild
/// users-redis`), such a view answers as unavailable, so that reads fall back to the SQL view
/// instead of finding no user.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Layout {
    Unknown,
    /// Buckets (or no view at all yet): read it.
    Current,
    /// The earlier layout only, as seen then: looked at again after `LAYOUT_RECHECK`.
    Earlier(std::time::Instant),
}

/// How long a reader that found the earlier layout answers unavailable before it looks again.
const LAYOUT_RECHECK: std::time::Duration = std::time::Duration::from_secs(5);

impl RedisUserReader {
    /// Fail fast while Redis is down, so the replica answers instead.
    fn settings() -> RedisSettings {
        RedisSettings {
            connection_timeout: Some(std::time::Duration::from_millis(500)),
            response_timeout: Some(std::time::Duration::from_millis(500)),
            retries: Some(1),
        }
    }

    /// The reader over a connection made already.
    pub fn with_connection(conn: RedisConnection, prefix: impl Into<String>) -> Self {
        Self {
            conn,
            prefix: prefix.into(),
            generation: Arc::new(AtomicU64::new(1)),
            layout: Arc::new(std::sync::Mutex::new(Layout::Unknown)),
        }
    }

    /// Fails as unavailable while the view is only in an earlier version's layout (see
    /// `Layout`); one look at Redis per process once it is current.
    async fn current_layout(&self) -> Result<(), PortError> {
        let known = *self.layout.lock().unwrap_or_else(|e| e.into_inner());
        match known {
            Layout::Current => return Ok(()),
            Layout::Earlier(at) if at.elapsed() < LAYOUT_RECHECK => return Err(earlier_layout()),
            _ => {}
        }
        // Two commands, not a pipeline: the keys lie in different slots of a cluster.
        let exists = |key: String| {
            let mut conn = self.conn.clone();
            async move {
                redis::cmd("EXISTS")
                    .arg(key)
                    .query_async::<bool>(&mut conn)
                    .await
                    .map_err(pcf_adapters::redis::port_error)
            }
        };
        let buckets = exists(redis_active_key(&self.prefix, 0)).await?;
        let earlier = !buckets && exists(format!("{}:active", self.prefix)).await?;
        let layout = if earlier {
            Layout::Earlier(std::time::Instant::now())
        } else {
            Layout::Current
        };
        *self.layout.lock().unwrap_or_else(|e| e.into_inner()) = layout;
        match layout {
            Layout::Current => Ok(()),
            _ => Err(earlier_layout()),
        }
    }

    /// Connects to Redis at `url` (one server, or comma-separated cluster seeds); fails if
    /// Redis does not answer.
    pub async fn connect(url: &str, prefix: impl Into<String>) -> Result<Self, PortError> {
        let conn = RedisConnection::connect(url, Self::settings())
            .await
            .map_err(pcf_adapters::redis::port_error)?;
        Ok(Self::with_connection(conn, prefix))
    }

    /// A reader of Redis at `url` that connects on its first read instead of now, so that a
    /// server starts while Redis is down: until Redis answers, every read fails as
    /// unavailable (and a `FallbackReader` answers from the replica), and each failure has
    /// the connection try again. Fails only for a malformed URL.
    pub fn connect_lazily(url: &str, prefix: impl Into<String>) -> Result<Self, PortError> {
        let conn = RedisConnection::connect_lazily(url, Self::settings())
            .map_err(pcf_adapters::redis::port_error)?;
        Ok(Self::with_connection(conn, prefix))
    }

    /// Succeeds when Redis answers.
    pub async fn ping(&self) -> Result<(), PortError> {
        pcf_adapters::redis::ping(&self.conn).await
    }

    /// `USERS_BY_ID` for `ids` (of one bucket on a cluster).
    async fn users_in_one_call(&self, ids: &[Uuid]) -> Result<Vec<Option<String>>, PortError> {
        let mut invocation = USERS_BY_ID.key(redis_active_key(&self.prefix, user_bucket(ids[0])));
        invocation.arg(&self.prefix).arg(REDIS_BUCKETS);
        for id in ids {
            invocation.arg(id.to_string());
        }
        invocation
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(pcf_adapters::redis::port_error)
    }
}

#[async_trait]
impl UserReader for RedisUserReader {
    #[tracing::instrument(level = "debug", name = "redis.read", skip_all)]
    async fn user(&self, id: Uuid) -> Result<Option<UserView>, PortError> {
        self.current_layout().await?;
        let mut conn = self.conn.clone();
        let assumed = self.generation.load(Ordering::Relaxed);
        let (active, doc): (Option<u64>, Option<String>) = redis::pipe()
            .get(redis_active_key(&self.prefix, user_bucket(id)))
            .get(redis_user_key(&self.prefix, assumed, id))
            .query_async(&mut conn)
            .await
            .map_err(pcf_adapters::redis::port_error)?;
        let active = active.unwrap_or(1);
        if active == assumed {
            return parse_doc(doc);
        }
        self.generation.store(active, Ordering::Relaxed);
        let doc: Option<String> = redis::cmd("GET")
            .arg(redis_user_key(&self.prefix, active, id))
            .query_async(&mut conn)
            .await
            .map_err(pcf_adapters::redis::port_error)?;
        parse_doc(doc)
    }

    /// One script call on one server; on a cluster a call per bucket, concurrently.
    #[tracing::instrument(level = "debug", name = "redis.read", skip_all)]
    async fn users(&self, ids: &[Uuid]) -> Result<Vec<UserView>, PortError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        self.current_layout().await?;
        let docs = if self.conn.is_cluster() {
            let mut by_bucket: BTreeMap<u32, Vec<Uuid>> = BTreeMap::new();
            for id in ids {
                by_bucket.entry(user_bucket(*id)).or_default().push(*id);
            }
            let answers = futures::future::try_join_all(
                by_bucket.values().map(|ids| self.users_in_one_call(ids)),
            )
            .await?;
            let mut found: BTreeMap<Uuid, Option<String>> = BTreeMap::new();
            for (ids, docs) in by_bucket.values().zip(answers) {
                found.extend(ids.iter().copied().zip(docs));
            }
            ids.iter()
                .map(|id| found.get(id).cloned().flatten())
                .collect()
        } else {
            self.users_in_one_call(ids).await?
        };
        let mut found = Vec::with_capacity(docs.len());
        for doc in docs {
            if let Some(view) = parse_doc(doc)? {
                found.push(view);
            }
        }
        Ok(found)
    }

    /// Follows the email entry to the document; only a live document that still has this
    /// email answers (an entry the email step has not yet deleted reads as not found). One
    /// round trip on one server; two on a cluster (the entry's bucket, then the user's).
    #[tracing::instrument(level = "debug", name = "redis.read", skip_all)]
    async fn user_by_email(&self, email: &Email) -> Result<Option<UserView>, PortError> {
        self.current_layout().await?;
        let bucket = email_bucket(email.as_str());
        let active_key = redis_active_key(&self.prefix, bucket);
        let tag = redis_bucket_tag(&self.prefix, bucket);
        let view = if self.conn.is_cluster() {
            let id: Option<String> = EMAIL_ENTRY
                .key(active_key)
                .arg(tag)
                .arg(email.as_str())
                .invoke_async(&mut self.conn.clone())
                .await
                .map_err(pcf_adapters::redis::port_error)?;
            match id.as_deref().map(Uuid::parse_str) {
                Some(Ok(id)) => self.user(id).await?,
                Some(Err(e)) => {
                    return Err(PortError::Internal(format!("email entry: {e}")));
                }
                None => None,
            }
        } else {
            let doc: Option<String> = USER_BY_EMAIL
                .key(active_key)
                .arg(tag)
                .arg(email.as_str())
                .arg(&self.prefix)
                .arg(REDIS_BUCKETS)
                .invoke_async(&mut self.conn.clone())
                .await
                .map_err(pcf_adapters::redis::port_error)?;
            parse_doc(doc)?
        };
        Ok(view.filter(|v| !v.deleted && v.email == email.as_str()))
    }

    #[tracing::instrument(level = "debug", name = "redis.read", skip_all)]
    async fn list(
        &self,
        _after: Option<Uuid>,
        _limit: usize,
        _filter: &UserFilter,
    ) -> Result<Vec<UserView>, PortError> {
        Err(PortError::Internal(
            "the Redis view serves point reads; lists come from the SQL view".into(),
        ))
    }
}

/// A query of the SQL view, with its arguments bound.
type SqlQuery<'q> = sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>;

fn sql_error(e: sqlx::Error) -> PortError {
    pcf_adapters::sql::port_error("read replica", e)
}

/// The SQL user view on the read replicas, taken in turn (one that is down is skipped).
pub struct SqlUserReader {
    replicas: Vec<PgPool>,
    next: AtomicUsize,
    /// Until when each replica is passed over after it was found unavailable.
    resting: Vec<std::sync::Mutex<Option<std::time::Instant>>>,
}

/// How long a read replica found unavailable is passed over (while another answers).
const REPLICA_REST: std::time::Duration = std::time::Duration::from_secs(2);

impl SqlUserReader {
    /// `replicas` must not be empty.
    pub fn new(replicas: Vec<PgPool>) -> Self {
        assert!(!replicas.is_empty(), "at least one read replica");
        let resting = replicas.iter().map(|_| Default::default()).collect();
        Self {
            replicas,
            next: AtomicUsize::new(0),
            resting,
        }
    }

    /// Runs `read` on the next replica in turn; a replica that is unavailable is skipped for
    /// the one after it (each replica tried once), so reads go on while one is down.
    async fn on_replicas<'a, T, F, Fut>(&'a self, read: F) -> Result<T, PortError>
    where
        F: Fn(&'a PgPool) -> Fut,
        Fut: std::future::Future<Output = Result<T, sqlx::Error>>,
    {
        let n = self.replicas.len();
        let first = self.next.fetch_add(1, Ordering::Relaxed);
        let now = std::time::Instant::now();
        let resting = |r: usize| {
            let until = *self.resting[r].lock().unwrap_or_else(|e| e.into_inner());
            until.is_some_and(|until| until > now)
        };
        // Those not resting first, in turn; the resting ones last, in case all are.
        let mut order: Vec<usize> = (0..n).map(|i| (first + i) % n).collect();
        order.sort_by_key(|&r| resting(r));
        let mut last = None;
        for r in order {
            match read(&self.replicas[r]).await.map_err(sql_error) {
                Err(PortError::Unavailable(detail)) => {
                    tracing::debug!(replica = r, %detail, "a read replica is unavailable; trying the next");
                    *self.resting[r].lock().unwrap_or_else(|e| e.into_inner()) =
                        Some(std::time::Instant::now() + REPLICA_REST);
                    last = Some(PortError::Unavailable(detail));
                }
                other => return other,
            }
        }
        Err(last.unwrap_or_else(|| PortError::Unavailable("no read replica".into())))
    }

    /// The users the query `make` builds selects, read on the next replica that answers.
    #[tracing::instrument(level = "debug", name = "replica.read", skip_all)]
    async fn fetch_users<'q>(
        &self,
        make: impl Fn() -> SqlQuery<'q>,
    ) -> Result<Vec<UserView>, PortError> {
        let rows = self.on_replicas(|pool| make().fetch_all(pool)).await?;
        rows.iter()
            .map(read_user)
            .collect::<Result<_, _>>()
            .map_err(sql_error)
    }

    /// The user the query `make` builds selects (at most one row), read on the next replica
    /// that answers.
    #[tracing::instrument(level = "debug", name = "replica.read", skip_all)]
    async fn fetch_user<'q>(
        &self,
        make: impl Fn() -> SqlQuery<'q>,
    ) -> Result<Option<UserView>, PortError> {
        let row = self.on_replicas(|pool| make().fetch_optional(pool)).await?;
        row.map(|r| read_user(&r)).transpose().map_err(sql_error)
    }

    /// How many of the replicas answer, of how many.
    pub async fn answering(&self) -> (usize, usize) {
        // A pool retries a refused connection until its acquire timeout: each replica gets
        // a second and a half, all at once.
        let pings = self.replicas.iter().map(|pool| async move {
            let ping = sqlx::query("SELECT 1").execute(pool);
            let answer = tokio::time::timeout(std::time::Duration::from_millis(1500), ping);
            matches!(answer.await, Ok(Ok(_)))
        });
        let answers = futures::future::join_all(pings).await;
        (answers.iter().filter(|ok| **ok).count(), answers.len())
    }

    /// Succeeds when every replica answers.
    pub async fn ping(&self) -> Result<(), PortError> {
        for pool in &self.replicas {
            sqlx::query("SELECT 1")
                .execute(pool)
                .await
                .map_err(sql_error)?;
        }
        Ok(())
    }
}

#[async_trait]
impl UserReader for SqlUserReader {
    async fn user(&self, id: Uuid) -> Result<Option<UserView>, PortError> {
        let sql = format!("SELECT * FROM {SQL_VIEW} WHERE id = $1");
        self.fetch_user(|| sqlx::query(&sql).bind(id)).await
    }

    async fn users(&self, ids: &[Uuid]) -> Result<Vec<UserView>, PortError> {
        let sql = format!("SELECT * FROM {SQL_VIEW} WHERE id = ANY($1)");
        self.fetch_users(|| sqlx::query(&sql).bind(ids)).await
    }

    async fn user_by_email(&self, email: &Email) -> Result<Option<UserView>, PortError> {
        let sql = format!("SELECT * FROM {SQL_VIEW} WHERE email = $1 AND NOT deleted LIMIT 1");
        self.fetch_user(|| sqlx::query(&sql).bind(email.as_str()))
            .await
    }

    async fn list(
        &self,
        after: Option<Uuid>,
        limit: usize,
        filter: &UserFilter,
    ) -> Result<Vec<UserView>, PortError> {
        // Keyset pagination on the (time-ordered) id: no OFFSET, stable under inserts.
        let sql = format!(
            "SELECT * FROM {SQL_VIEW} WHERE NOT deleted \
               AND ($1::uuid IS NULL OR id > $1) \
               AND ($2::text IS NULL OR email = $2) \
               AND ($3::text IS NULL OR display_name ILIKE '%' || $3 || '%' ESCAPE '\\') \
               AND ($4::timestamptz IS NULL OR created_at > $4) \
               AND ($5::timestamptz IS NULL OR created_at < $5) \
             ORDER BY id LIMIT $6"
        );
        let needle = filter.display_name_contains.as_deref().map(escape_like);
        self.fetch_users(|| {
            sqlx::query(&sql)
                .bind(after)
                .bind(&filter.email)
                .bind(needle.clone())
                .bind(filter.created_after)
                .bind(filter.created_before)
                .bind(limit as i64)
        })
        .await
    }
}

/// Makes `%`, `_` and `\` match themselves in a LIKE pattern.
fn escape_like(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('%', "\\%")
        .replace('_', "\\_")
}

/// Point reads from the primary reader, falling back to the other when it is unavailable
/// (and, for a few seconds after a failure, going to the fallback directly instead of
/// waiting on the primary per request); lists from the fallback (the SQL view).
///
/// Each call decides on its own outcome: a call that asked the primary and got
/// `Unavailable` asks the fallback, whatever other calls have meanwhile recorded about the
/// primary (reading that shared state again after the call would send a call that failed on
/// the primary back to its caller as unavailable, when another call's failure had just
/// marked the primary down).
pub struct FallbackReader {
    primary: Arc<dyn UserReader>,
    fallback: Arc<dyn UserReader>,
    primary_down_until: std::sync::Mutex<Option<std::time::Instant>>,
    /// Point reads the fallback answered (for metrics).
    fallbacks: Arc<std::sync::atomic::AtomicU64>,
}

impl FallbackReader {
    pub fn new(primary: Arc<dyn UserReader>, fallback: Arc<dyn UserReader>) -> Self {
        Self {
            primary,
            fallback,
            primary_down_until: std::sync::Mutex::new(None),
            fallbacks: Arc::default(),
        }
    }

    /// How many reads the fallback has answered, counting on.
    pub fn fallbacks(&self) -> Arc<std::sync::atomic::AtomicU64> {
        self.fallbacks.clone()
    }

    /// Whether a recent failure of the primary sends point reads to the fallback directly.
    fn primary_resting(&self) -> bool {
        let down = self
            .primary_down_until
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        matches!(*down, Some(until) if std::time::Instant::now() < until)
    }

    fn primary_failed(&self, detail: &str) {
        tracing::warn!(%detail, "point reads falling back to the read replica for 2 s");
        *self
            .primary_down_until
            .lock()
            .unwrap_or_else(|e| e.into_inner()) =
            Some(std::time::Instant::now() + std::time::Duration::from_secs(2));
    }
}

impl FallbackReader {
    /// `read` on the primary, or on the fallback while the primary rests or when this very
    /// call found it unavailable.
    async fn read<'a, T, F, Fut>(&'a self, read: F) -> Result<T, PortError>
    where
        F: Fn(&'a Arc<dyn UserReader>) -> Fut,
        Fut: std::future::Future<Output = Result<T, PortError>>,
    {
        let fallen_back = || {
            self.fallbacks
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        };
        if self.primary_resting() {
            fallen_back();
            return read(&self.fallback).await;
        }
        match read(&self.primary).await {
            Err(PortError::Unavailable(detail)) => {
                self.primary_failed(&detail);
                fallen_back();
                read(&self.fallback).await
            }
            other => other,
        }
    }
}

#[async_trait]
impl UserReader for FallbackReader {
    async fn user(&self, id: Uuid) -> Result<Option<UserView>, PortError> {
        self.read(|r| r.user(id)).await
    }

    async fn users(&self, ids: &[Uuid]) -> Result<Vec<UserView>, PortError> {
        self.read(|r| r.users(ids)).await
    }

    async fn user_by_email(&self, email: &Email) -> Result<Option<UserView>, PortError> {
        self.read(|r| r.user_by_email(email)).await
    }

    async fn list(
        &self,
        after: Option<Uuid>,
        limit: usize,
        filter: &UserFilter,
    ) -> Result<Vec<UserView>, PortError> {
        self.fallback.list(after, limit, filter).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn like_wildcards_in_a_filter_match_themselves() {
        assert_eq!(escape_like("50%_a\\b"), "50\\%\\_a\\\\b");
    }

    fn view(id: Uuid, email: &str) -> UserView {
        let now = chrono::Utc::now();
        UserView {
            id,
            email: email.to_owned(),
            display_name: "Fallback".to_owned(),
            bio: None,
            avatar_url: None,
            created_at: now,
            updated_at: now,
            version: 1,
            deleted: false,
        }
    }

    /// A reader for the tests, counting its reads: one that is down fails every read as
    /// unavailable; one that is up has every user asked for. Email reads can be held on
    /// their way back, to answer only when the test says.
    #[derive(Default)]
    struct Fake {
        down: bool,
        calls: AtomicUsize,
        hold_email_reads: bool,
        email_read_started: tokio::sync::Notify,
        release_email_read: tokio::sync::Notify,
    }

    impl Fake {
        fn down() -> Self {
            Self {
                down: true,
                ..Self::default()
            }
        }

        /// Counts a read: `found` when up, else unavailable.
        fn answer<T>(&self, found: T) -> Result<T, PortError> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            if self.down {
                Err(PortError::Unavailable("redis: connection refused".into()))
            } else {
                Ok(found)
            }
        }
    }

    #[async_trait]
    impl UserReader for Fake {
        async fn user(&self, id: Uuid) -> Result<Option<UserView>, PortError> {
            self.answer(Some(view(id, "someone@example.com")))
        }

        async fn users(&self, ids: &[Uuid]) -> Result<Vec<UserView>, PortError> {
            self.answer(
                ids.iter()
                    .map(|id| view(*id, "someone@example.com"))
                    .collect(),
            )
        }

        async fn user_by_email(&self, email: &Email) -> Result<Option<UserView>, PortError> {
            if self.hold_email_reads {
                self.email_read_started.notify_one();
                self.release_email_read.notified().await;
            }
            self.answer(Some(view(Uuid::new_v4(), email.as_str())))
        }

        async fn list(
            &self,
            _after: Option<Uuid>,
            _limit: usize,
            _filter: &UserFilter,
        ) -> Result<Vec<UserView>, PortError> {
            self.answer(Vec::new())
        }
    }

    fn email() -> Email {
        Email::parse("someone@example.com").expect("an email")
    }

    /// A first read, `read`, through a reader whose primary is down: it asks the primary,
    /// then the fallback, once each. What it found, the reader and its primary.
    async fn first_read<T, Fut>(
        read: impl FnOnce(Arc<FallbackReader>) -> Fut,
    ) -> (T, Arc<FallbackReader>, Arc<Fake>)
    where
        Fut: std::future::Future<Output = Result<T, PortError>>,
    {
        let (primary, fallback) = (Arc::new(Fake::down()), Arc::new(Fake::default()));
        let reader = Arc::new(FallbackReader::new(primary.clone(), fallback.clone()));
        let found = read(reader.clone()).await.expect("the fallback answers");
        assert_eq!(primary.calls.load(Ordering::SeqCst), 1, "asked the primary");
        assert_eq!(
            fallback.calls.load(Ordering::SeqCst),
            1,
            "then the fallback"
        );
        (found, reader, primary)
    }

    #[tokio::test]
    async fn the_first_failure_of_the_primary_is_answered_by_the_fallback() {
        let id = Uuid::new_v4();
        let (found, _, _) = first_read(|r| async move { r.user_by_email(&email()).await }).await;
        assert_eq!(found.map(|v| v.email), Some(email().as_str().to_owned()));
        let (found, _, _) = first_read(|r| async move { r.user(id).await }).await;
        assert_eq!(found.map(|v| v.id), Some(id));
        let (found, reader, primary) = first_read(|r| async move { r.users(&[id]).await }).await;
        assert_eq!(found.iter().map(|v| v.id).collect::<Vec<_>>(), vec![id]);

        // Right after a failure the fallback answers without the primary being asked.
        let asked = primary.calls.load(Ordering::SeqCst);
        reader.user(id).await.expect("user");
        reader.user_by_email(&email()).await.expect("userByEmail");
        assert_eq!(primary.calls.load(Ordering::SeqCst), asked);
        // Every read the fallback answered is counted: the first, and the two after it.
        assert_eq!(reader.fallbacks().load(Ordering::Relaxed), 3);
    }

    /// Two reads on the primary when it goes down: the second to fail falls back as well,
    /// although the first one's failure has marked the primary down meanwhile.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_read_that_failed_on_the_primary_falls_back_whatever_other_reads_found() {
        let primary = Arc::new(Fake {
            hold_email_reads: true,
            ..Fake::down()
        });
        let reader = Arc::new(FallbackReader::new(
            primary.clone(),
            Arc::new(Fake::default()),
        ));
        let by_email = tokio::spawn({
            let reader = reader.clone();
            async move { reader.user_by_email(&email()).await }
        });
        // The email read is on the primary; a point read by id fails there and falls back.
        tokio::time::timeout(
            std::time::Duration::from_secs(10),
            primary.email_read_started.notified(),
        )
        .await
        .expect("the email read reaches the primary");
        let id = Uuid::new_v4();
        let by_id = reader.user(id).await.expect("user(id) falls back");
        assert_eq!(by_id.map(|v| v.id), Some(id));
        // Now the email read fails on the primary too.
        primary.release_email_read.notify_one();
        let by_email = tokio::time::timeout(std::time::Duration::from_secs(10), by_email)
            .await
            .expect("the email read ends")
            .expect("the email read's task");
        let by_email = by_email.expect("userByEmail falls back, not UNAVAILABLE");
        assert_eq!(by_email.map(|v| v.email), Some(email().as_str().to_owned()));
        assert_eq!(primary.calls.load(Ordering::SeqCst), 2);
    }
}
