//! The Redis user view: one JSON document per user plus an email index, under a generation
//! prefix; every change of a user is guarded by the user's version.
//!
//! Keys are spread over buckets (`pcf_domain::read_model`), each bucket one hash tag, so one
//! slot of a Redis Cluster, with its own copy of the generation state. On one server a
//! batch is one pipeline and each script call changes documents and email entries at once.
//! On a cluster every script call keeps to one bucket, the calls of one step go out
//! concurrently, and a change is three steps: the documents (each bucket's call checks that
//! bucket's generation state, and leaves a pending mark per user), then the email entries
//! (set the new one; delete the old one only if it still names the user), then the marks
//! are cleared. A mark found when a user is loaded again (the email step never ran: a crash,
//! an error) has the email step redone first.

use async_trait::async_trait;
use futures::future::try_join_all;
use futures::{StreamExt, TryStreamExt};
use pcf_adapters::redis::RedisConnection;
use pcf_domain::ports::PortError;
use pcf_domain::read_model::{
    redis_active_key, redis_bucket_tag, redis_building_key, redis_email_key,
    redis_generation_pattern, redis_user_key, user_bucket, REDIS_BUCKETS,
};
use pcf_domain::UserView;
use redis::{AsyncCommands, Script};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, LazyLock};
use uuid::Uuid;

use crate::store::{
    BatchGenerations, GenerationState, Offsets, Scope, ViewBatch, ViewStore, Written,
};

/// Replaces users' documents where each is still at the version it was folded from, and
/// moves their email entries: one call for many users. Per user, at KEYS[3+4i] (document),
/// KEYS[4+4i] (new email entry), KEYS[5+4i] (old email entry), KEYS[6+4i] (the pending
/// mark), each the document's key again for none (a key of another slot, even '', is
/// refused on a cluster: there the email entries are none, on one server the mark), ARGV[3+5i]
/// (document), ARGV[4+5i] (its version), ARGV[5+5i] (the version it was folded from),
/// ARGV[6+5i] (the user's id), ARGV[7+5i] (the mark); the outcome for each: 1 written,
/// 2 the stored one is at exactly this version, 0 it is newer, -1 it moved since it was
/// read. With the state's keys (KEYS[1], building, and KEYS[2], active: of the bucket of
/// the users on a cluster), the writes happen only while the generation state is still the
/// one the writer knows (ARGV[1] and ARGV[2], '' for none; ARGV[1] '-': not checked, a
/// rebuild's batch); else the only outcome is -2:
/// the state moved (a rebuild began or switched) and the batch must be written again for
/// the new state.
static REPLACE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
if ARGV[1] ~= '-' then
  if (redis.call('GET', KEYS[1]) or '') ~= ARGV[1] then return {-2} end
  if (redis.call('GET', KEYS[2]) or '1') ~= ARGV[2] then return {-2} end
end
local outcomes = {}
for i = 0, (#KEYS - 2) / 4 - 1 do
  local k = 3 + 4 * i
  local a = 3 + 5 * i
  local current = redis.call('GET', KEYS[k])
  local stored = 0
  if current then stored = tonumber(cjson.decode(current)['version']) end
  local outcome = 1
  if tonumber(ARGV[a + 1]) == stored then
    outcome = 2
  elseif tonumber(ARGV[a + 1]) < stored then
    outcome = 0
  elseif stored ~= tonumber(ARGV[a + 2]) then
    outcome = -1
  else
    if KEYS[k + 2] ~= KEYS[k] and redis.call('GET', KEYS[k + 2]) == ARGV[a + 3] then
      redis.call('DEL', KEYS[k + 2])
    end
    if KEYS[k + 1] ~= KEYS[k] then redis.call('SET', KEYS[k + 1], ARGV[a + 3]) end
    if KEYS[k + 3] ~= KEYS[k] then redis.call('SET', KEYS[k + 3], ARGV[a + 4]) end
    redis.call('SET', KEYS[k], ARGV[a])
  end
  outcomes[i + 1] = outcome
end
return outcomes
"#,
    )
});

/// Users per call of `REPLACE`: a call holds Redis for its whole length (about 5 µs a user).
const USERS_PER_CALL: usize = 200;
/// Users one server is sent in one pipeline (a rebuild's fill, or guarded writes), and how
/// many such pipelines are in flight at once. A rebuild's window (up to 50,000 users, tens
/// of megabytes) as one pipeline is one request to the client, under one response timeout
/// (500 ms by default): on a busy machine it ran out, and the whole window was written
/// again. Bounded pipelines each answer within a few tens of milliseconds, and other
/// clients' commands (live reads) are served between them.
const USERS_PER_PIPELINE: usize = 2_000;
const PIPELINES_IN_FLIGHT: usize = 4;

/// Writes the documents of users that have none yet (`SET NX`), on a cluster (within one
/// bucket): KEYS[i] a document's key, ARGV[i] the document. For each: 1 written, 0 the user
/// has a document already (left as it is, for the guarded script to decide).
static FILL: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local outcomes = {}
for i = 1, #KEYS do
  outcomes[i] = redis.call('SET', KEYS[i], ARGV[i], 'NX') and 1 or 0
end
return outcomes
"#,
    )
});

/// The email step on a cluster, in one bucket of email entries: for KEYS[i], ARGV[2i-1]
/// is what to do and ARGV[2i] the user's id: 's' names the user, 'r' names the user unless
/// the entry names another (a repair, which may be late), 'd' deletes the entry if it
/// still names the user. Answers {the number of entries}.
static EMAILS: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
for i = 1, #KEYS do
  local op = ARGV[2 * i - 1]
  local id = ARGV[2 * i]
  if op == 's' then
    redis.call('SET', KEYS[i], id)
  elseif op == 'r' then
    local current = redis.call('GET', KEYS[i])
    if (not current) or current == id then redis.call('SET', KEYS[i], id) end
  elseif redis.call('GET', KEYS[i]) == id then
    redis.call('DEL', KEYS[i])
  end
end
return {#KEYS}
"#,
    )
});

/// Clears pending marks (KEYS[i]) that are still the ones written (ARGV[i]).
static CLEAR_MARKS: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
for i = 1, #KEYS do
  if redis.call('GET', KEYS[i]) == ARGV[i] then redis.call('DEL', KEYS[i]) end
end
return {#KEYS}
"#,
    )
});

/// Begins a build in one bucket: KEYS[1] active (set if unset to ARGV[1]), KEYS[2]
/// building (ARGV[2]).
static BEGIN: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
redis.call('SET', KEYS[1], ARGV[1], 'NX')
redis.call('SET', KEYS[2], ARGV[2])
return {1}
"#,
    )
});

/// Switches one bucket to generation ARGV[1]: KEYS[1] active, KEYS[2] building (deleted).
static SWITCH: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
redis.call('SET', KEYS[1], ARGV[1])
redis.call('DEL', KEYS[2])
return {1}
"#,
    )
});

/// Ends a switch to ARGV[1] that was interrupted: in a bucket still building it.
static FINISH_SWITCH: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
if redis.call('GET', KEYS[2]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1])
  redis.call('DEL', KEYS[2])
end
return {1}
"#,
    )
});

/// Ends a begin of ARGV[2] (with ARGV[1] active) that was interrupted: in a bucket with
/// that active generation and no build.
static FINISH_BEGIN: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
if (redis.call('GET', KEYS[1]) or '1') == ARGV[1] and not redis.call('GET', KEYS[2]) then
  redis.call('SET', KEYS[1], ARGV[1], 'NX')
  redis.call('SET', KEYS[2], ARGV[2])
end
return {1}
"#,
    )
});

/// Sends `pipe` (calls of `script`, each answering a list of outcomes), loading the script
/// first if Redis has forgotten it (a restart, a failover); the outcomes of all the calls,
/// in order.
async fn query_scripts(
    conn: &RedisConnection,
    script: &Script,
    pipe: &redis::Pipeline,
) -> Result<Vec<i64>, PortError> {
    let mut conn = conn.clone();
    let outcomes: Vec<Vec<i64>> = match pipe.query_async(&mut conn).await {
        Ok(o) => o,
        Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
            script
                .prepare_invoke()
                .load_async(&mut conn)
                .await
                .map_err(pcf_adapters::redis::port_error)?;
            pipe.query_async(&mut conn)
                .await
                .map_err(pcf_adapters::redis::port_error)?
        }
        Err(e) => return Err(pcf_adapters::redis::port_error(e)),
    };
    Ok(outcomes.into_iter().flatten().collect())
}

/// Sends each pipeline (each within one slot on a cluster) concurrently, on one server
/// `PIPELINES_IN_FLIGHT` at a time; the outcomes of each, in order.
async fn query_each(
    conn: &RedisConnection,
    script: &Script,
    pipes: &[redis::Pipeline],
) -> Result<Vec<Vec<i64>>, PortError> {
    let calls = pipes.iter().map(|p| query_scripts(conn, script, p));
    if conn.is_cluster() {
        return try_join_all(calls).await;
    }
    a_few_at_a_time(calls.collect()).await
}

/// Runs `calls` (each a pipeline sent to one server) `PIPELINES_IN_FLIGHT` at a time; their
/// answers in order. The calls are made before they are streamed (a call starts when first
/// polled): made by the stream, they are not `Send` for every lifetime their callers need.
async fn a_few_at_a_time<T, E>(
    calls: Vec<impl std::future::Future<Output = Result<T, E>>>,
) -> Result<Vec<T>, E> {
    futures::stream::iter(calls)
        .buffered(PIPELINES_IN_FLIGHT)
        .try_collect()
        .await
}

/// `outcomes`, checked to be one per user written.
fn one_per_user(outcomes: Vec<i64>, users: usize) -> Result<Vec<i64>, PortError> {
    if outcomes.len() != users {
        return Err(PortError::Internal(format!(
            "{} outcomes for {users} users written",
            outcomes.len()
        )));
    }
    Ok(outcomes)
}

/// A user's document as stored.
fn document(user: &UserView) -> Result<String, PortError> {
    serde_json::to_string(user).map_err(|e| PortError::Internal(e.to_string()))
}

/// The pending mark of a user's document in one generation (same bucket as the document).
fn mark_key(prefix: &str, generation: u64, id: Uuid) -> String {
    format!(
        "{}:g{generation}:pending:{id}",
        redis_bucket_tag(prefix, user_bucket(id))
    )
}

/// A pending mark: the version written and the email the user had before ('' for none).
fn mark_value(version: u64, old_email: &str) -> String {
    format!("{version}|{old_email}")
}

/// One operation of the email step.
struct EmailOp {
    key: String,
    op: &'static str,
    id: Uuid,
}

/// Runs the email step: the operations grouped by bucket, a call per bucket, concurrently.
async fn email_step(conn: &RedisConnection, ops: Vec<EmailOp>) -> Result<(), PortError> {
    if ops.is_empty() {
        return Ok(());
    }
    let mut by_bucket: BTreeMap<String, Vec<EmailOp>> = BTreeMap::new();
    for op in ops {
        // The hash tag, `{...}`, is the bucket.
        let tag = op.key[..=op.key.find('}').unwrap_or(0)].to_owned();
        by_bucket.entry(tag).or_default().push(op);
    }
    let pipes: Vec<redis::Pipeline> = by_bucket
        .values()
        .map(|ops| {
            let mut pipe = redis::pipe();
            for chunk in ops.chunks(USERS_PER_CALL) {
                let call = pipe.cmd("EVALSHA").arg(EMAILS.get_hash()).arg(chunk.len());
                for op in chunk {
                    call.arg(&op.key);
                }
                for op in chunk {
                    call.arg(op.op).arg(op.id.to_string());
                }
            }
            pipe
        })
        .collect();
    query_each(conn, &EMAILS, &pipes).await.map(|_| ())
}

/// Clears pending marks (key, value), a call per bucket, concurrently.
async fn clear_marks(
    conn: &RedisConnection,
    marks: Vec<(u32, String, String)>,
) -> Result<(), PortError> {
    let mut by_bucket: BTreeMap<u32, Vec<(String, String)>> = BTreeMap::new();
    for (bucket, key, value) in marks {
        by_bucket.entry(bucket).or_default().push((key, value));
    }
    let pipes: Vec<redis::Pipeline> = by_bucket
        .values()
        .map(|marks| {
            let mut pipe = redis::pipe();
            for chunk in marks.chunks(USERS_PER_CALL) {
                let call = pipe
                    .cmd("EVALSHA")
                    .arg(CLEAR_MARKS.get_hash())
                    .arg(chunk.len());
                for (key, _) in chunk {
                    call.arg(key);
                }
                for (_, value) in chunk {
                    call.arg(value);
                }
            }
            pipe
        })
        .collect();
    query_each(conn, &CLEAR_MARKS, &pipes).await.map(|_| ())
}

/// Deletes every key matching `pattern`, a page of `SCAN` at a time on each primary of a
/// cluster (on the one server otherwise); `UNLINK`: Redis frees the values in the
/// background (on a cluster the client splits it by slot).
pub async fn delete_matching(conn: &RedisConnection, pattern: &str) -> redis::RedisResult<()> {
    let mut scan = conn.scan(pattern).await?;
    while let Some(keys) = scan.page().await? {
        let _: redis::Value = redis::cmd("UNLINK")
            .arg(&keys)
            .query_async(&mut conn.clone())
            .await?;
    }
    Ok(())
}

/// How many users' documents live writes remember; when full, they start over.
const REMEMBERED: usize = 65_536;

/// The documents live writes wrote last, by generation and user: the next batch folds on
/// them instead of reading them back (one round trip a batch instead of two). Nothing here
/// is trusted: every write is guarded by the version it was folded from, so a document
/// another writer moved meanwhile (a rebuild, another consumer after a rebalance, a
/// generation dropped and begun again) is refused and goes the slow way, reading what is
/// stored.
#[derive(Default)]
struct Remembered {
    views: HashMap<(u64, Uuid), UserView>,
}

impl Remembered {
    fn remember(&mut self, generation: u64, view: UserView) {
        if self.views.len() >= REMEMBERED {
            self.views.clear();
        }
        self.views.insert((generation, view.id), view);
    }
}

/// A batch of writes to the Redis view: each call of a script is atomic and guarded by
/// version, so there is nothing to commit; Kafka keeps this projection's offsets.
struct RedisBatch<'a> {
    views: &'a RedisUserViews,
    /// For live batches, the generation state they were opened with is checked in the
    /// script, and the documents live writes wrote last are read instead of Redis.
    generations: BatchGenerations,
}

/// Which pipelines a step sends: on one server a group per `USERS_PER_PIPELINE` users; on a
/// cluster a group per bucket (the bucket, the indexes of its users).
fn groups(cluster: bool, buckets: impl Iterator<Item = u32>) -> Vec<(u32, Vec<usize>)> {
    if !cluster {
        let all: Vec<usize> = buckets.enumerate().map(|(i, _)| i).collect();
        return all
            .chunks(USERS_PER_PIPELINE)
            .map(|chunk| (0, chunk.to_vec()))
            .collect();
    }
    let mut by_bucket: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
    for (i, b) in buckets.enumerate() {
        by_bucket.entry(b).or_default().push(i);
    }
    by_bucket.into_iter().collect()
}

impl RedisBatch<'_> {
    /// `write_newer` on one server: plain commands in bounded pipelines, no script. A document
    /// is set with its email entry only where neither exists (an entry left by another
    /// user sends this one the guarded way), a deleted user's document where it does not.
    async fn fill_one_server(
        &self,
        generation: u64,
        states: &[UserView],
    ) -> Result<Vec<bool>, PortError> {
        let pipes = states
            .chunks(USERS_PER_PIPELINE)
            .map(|chunk| self.fill_pipeline(generation, chunk))
            .collect::<Result<Vec<_>, _>>()?;
        let calls = pipes.iter().map(|pipe| {
            let mut conn = self.views.conn.clone();
            async move { pipe.query_async::<Vec<redis::Value>>(&mut conn).await }
        });
        let answers = a_few_at_a_time(calls.collect())
            .await
            .map_err(pcf_adapters::redis::port_error)?;
        let answers: Vec<redis::Value> = answers.into_iter().flatten().collect();
        if answers.len() != states.len() {
            return Err(PortError::Internal(format!(
                "{} answers for {} users written",
                answers.len(),
                states.len()
            )));
        }
        // MSETNX answers 1 or 0, SET NX OK or nil.
        Ok(answers
            .iter()
            .map(|a| matches!(a, redis::Value::Int(1) | redis::Value::Okay))
            .collect())
    }

    /// The fill of `states` on one server, as one pipeline.
    fn fill_pipeline(
        &self,
        generation: u64,
        states: &[UserView],
    ) -> Result<redis::Pipeline, PortError> {
        let mut pipe = redis::pipe();
        for state in states {
            let doc_key = redis_user_key(&self.views.prefix, generation, state.id);
            match self.email_key(generation, state) {
                Some(email) => pipe
                    .cmd("MSETNX")
                    .arg(doc_key)
                    .arg(document(state)?)
                    .arg(email)
                    .arg(state.id.to_string()),
                None => pipe.cmd("SET").arg(doc_key).arg(document(state)?).arg("NX"),
            };
        }
        Ok(pipe)
    }

    /// The email entry a user's document owns (none for a tombstone).
    fn email_key(&self, generation: u64, user: &UserView) -> Option<String> {
        (!user.deleted).then(|| redis_email_key(&self.views.prefix, generation, &user.email))
    }

    fn remembered(&self) -> Option<std::sync::MutexGuard<'_, Remembered>> {
        self.generations.opened_with().is_some().then(|| {
            self.views
                .remembered
                .lock()
                .unwrap_or_else(|e| e.into_inner())
        })
    }

    /// On a cluster: the email step of users whose pending marks were found (their email
    /// step never ran), then their marks cleared.
    async fn repair(
        &self,
        generation: u64,
        pending: Vec<(UserView, String)>,
    ) -> Result<(), PortError> {
        let prefix = &self.views.prefix;
        let mut ops = Vec::new();
        let mut marks = Vec::new();
        for (view, mark) in pending {
            let old = mark.split_once('|').map_or("", |(_, old)| old);
            if !view.deleted {
                ops.push(EmailOp {
                    key: redis_email_key(prefix, generation, &view.email),
                    op: "r",
                    id: view.id,
                });
            }
            if !old.is_empty() && (view.deleted || old != view.email) {
                ops.push(EmailOp {
                    key: redis_email_key(prefix, generation, old),
                    op: "d",
                    id: view.id,
                });
            }
            marks.push((
                user_bucket(view.id),
                mark_key(prefix, generation, view.id),
                mark,
            ));
        }
        tracing::info!(
            generation,
            users = marks.len(),
            "redoing the email step of users whose documents were written without it"
        );
        email_step(&self.views.conn, ops).await?;
        clear_marks(&self.views.conn, marks).await
    }
}

#[async_trait]
impl ViewBatch for RedisBatch<'_> {
    fn generations(&self) -> &[u64] {
        self.generations.targets()
    }

    #[tracing::instrument(level = "debug", name = "redis.load", skip_all, fields(generation = generation, users = ids.len()))]
    async fn load(
        &mut self,
        generation: u64,
        ids: &[Uuid],
    ) -> Result<HashMap<Uuid, UserView>, PortError> {
        let mut found = HashMap::with_capacity(ids.len());
        let mut unknown = Vec::with_capacity(ids.len());
        match self.remembered() {
            Some(remembered) => {
                for id in ids {
                    match remembered.views.get(&(generation, *id)) {
                        Some(view) => {
                            found.insert(*id, view.clone());
                        }
                        None => unknown.push(*id),
                    }
                }
            }
            None => unknown.extend_from_slice(ids),
        }
        if unknown.is_empty() {
            return Ok(found);
        }
        let cluster = self.views.conn.is_cluster();
        let prefix = &self.views.prefix;
        let mut keys: Vec<String> = unknown
            .iter()
            .map(|id| redis_user_key(prefix, generation, *id))
            .collect();
        if cluster {
            // With the pending marks (the client splits MGET by slot).
            keys.extend(unknown.iter().map(|id| mark_key(prefix, generation, *id)));
        }
        let mut docs: Vec<Option<String>> = redis::cmd("MGET")
            .arg(keys)
            .query_async(&mut self.views.conn.clone())
            .await
            .map_err(pcf_adapters::redis::port_error)?;
        let marks = docs.split_off(unknown.len());
        let mut pending = Vec::new();
        for (i, (id, doc)) in unknown.iter().zip(docs).enumerate() {
            if let Some(doc) = doc {
                let view = parse_document(&doc)?;
                if let Some(Some(mark)) = marks.get(i) {
                    pending.push((view.clone(), mark.clone()));
                }
                found.insert(*id, view);
            }
        }
        if !pending.is_empty() {
            self.repair(generation, pending).await?;
        }
        Ok(found)
    }

    /// Users without a document get theirs in one pipeline: a rebuild writes mostly those.
    /// Only for batches of one generation (a rebuild's): live writes go through the guarded
    /// script, which checks the generation state. On one server a user's document and email
    /// entry are set together where neither exists (`MSETNX`); on a cluster the documents go
    /// first (`FILL`, a call per bucket), then the email entries of those written. Users
    /// not written here are written the guarded way by the caller.
    #[tracing::instrument(level = "debug", name = "redis.write", skip_all, fields(generation = generation, users = states.len()))]
    async fn write_newer(
        &mut self,
        generation: u64,
        states: &[UserView],
    ) -> Result<Vec<bool>, PortError> {
        if self.generations.opened_with().is_some() || states.is_empty() {
            return Ok(vec![false; states.len()]);
        }
        if !self.views.conn.is_cluster() {
            return self.fill_one_server(generation, states).await;
        }
        let groups = groups(true, states.iter().map(|s| user_bucket(s.id)));
        let mut pipes = Vec::with_capacity(groups.len());
        for (_, members) in &groups {
            let mut pipe = redis::pipe();
            for chunk in members.chunks(USERS_PER_CALL) {
                let call = pipe.cmd("EVALSHA").arg(FILL.get_hash()).arg(chunk.len());
                // The email entries lie in other slots: they come after (the email step).
                for &i in chunk {
                    call.arg(redis_user_key(&self.views.prefix, generation, states[i].id));
                }
                for &i in chunk {
                    call.arg(document(&states[i])?);
                }
            }
            pipes.push(pipe);
        }
        let answers = query_each(&self.views.conn, &FILL, &pipes).await?;
        let mut written = vec![false; states.len()];
        for ((_, members), outcomes) in groups.iter().zip(answers) {
            let outcomes = one_per_user(outcomes, members.len())?;
            for (&i, o) in members.iter().zip(outcomes) {
                written[i] = o == 1;
            }
        }
        let ops = states
            .iter()
            .zip(&written)
            .filter(|(s, w)| **w && !s.deleted)
            .map(|(s, _)| EmailOp {
                key: redis_email_key(&self.views.prefix, generation, &s.email),
                op: "s",
                id: s.id,
            })
            .collect();
        email_step(&self.views.conn, ops).await?;
        Ok(written)
    }

    /// The guarded script, a call per `USERS_PER_CALL` users: on one server in pipelines of
    /// `USERS_PER_PIPELINE` users; on a cluster a pipeline per bucket, concurrently, then the
    /// email step and the marks cleared.
    #[tracing::instrument(level = "debug", name = "redis.write", skip_all, fields(generation = generation, users = changes.len()))]
    async fn replace(
        &mut self,
        generation: u64,
        changes: &[(Option<UserView>, UserView)],
    ) -> Result<Written, PortError> {
        if changes.is_empty() {
            return Ok(Written::Users(Vec::new()));
        }
        let cluster = self.views.conn.is_cluster();
        let prefix = &self.views.prefix;
        let opened = self.generations.opened_with();
        let (expected_building, expected_active) = match opened {
            Some(state) => (
                state.building.map(|b| b.to_string()).unwrap_or_default(),
                state.active.to_string(),
            ),
            None => ("-".to_owned(), String::new()),
        };
        // The email a user had before, where the change moves it ('' when it does not).
        let old_email = |previous: &Option<UserView>, next: &UserView| -> String {
            match previous {
                Some(p) if !p.deleted && (p.email != next.email || next.deleted) => p.email.clone(),
                _ => String::new(),
            }
        };
        let groups = groups(cluster, changes.iter().map(|(_, n)| user_bucket(n.id)));
        let mut pipes = Vec::with_capacity(groups.len());
        for (bucket, members) in &groups {
            let (building_key, active_key) = (
                redis_building_key(prefix, *bucket),
                redis_active_key(prefix, *bucket),
            );
            let mut pipe = redis::pipe();
            for chunk in members.chunks(USERS_PER_CALL) {
                let call = pipe
                    .cmd("EVALSHA")
                    .arg(REPLACE.get_hash())
                    .arg(2 + 4 * chunk.len())
                    .arg(&building_key)
                    .arg(&active_key);
                for &i in chunk {
                    let (previous, next) = &changes[i];
                    let old = old_email(previous, next);
                    let doc_key = redis_user_key(prefix, generation, next.id);
                    if cluster {
                        call.arg(&doc_key)
                            .arg(&doc_key)
                            .arg(&doc_key)
                            .arg(mark_key(prefix, generation, next.id));
                    } else {
                        let old_key = if old.is_empty() {
                            doc_key.clone()
                        } else {
                            redis_email_key(prefix, generation, &old)
                        };
                        let new_key = self
                            .email_key(generation, next)
                            .unwrap_or_else(|| doc_key.clone());
                        call.arg(&doc_key).arg(new_key).arg(old_key).arg(&doc_key);
                    }
                }
                call.arg(&expected_building).arg(&expected_active);
                for &i in chunk {
                    let (previous, next) = &changes[i];
                    call.arg(document(next)?)
                        .arg(next.version)
                        .arg(previous.as_ref().map_or(0, |p| p.version))
                        .arg(next.id.to_string());
                    // The mark (written on a cluster only).
                    if cluster {
                        call.arg(mark_value(next.version, &old_email(previous, next)));
                    } else {
                        call.arg("");
                    }
                }
            }
            pipes.push(pipe);
        }
        // Whatever happens to this write, what was remembered of these users may be out of
        // date after it; only a document written is remembered again.
        if let Some(mut remembered) = self.remembered() {
            for (_, next) in changes {
                remembered.views.remove(&(generation, next.id));
            }
        }
        let answers = query_each(&self.views.conn, &REPLACE, &pipes).await?;
        let mut outcomes = vec![-2; changes.len()];
        let mut moved = false;
        for ((_, members), answer) in groups.iter().zip(answers) {
            if answer.contains(&-2) {
                // The state moved in this bucket: nothing of it written.
                moved = true;
                continue;
            }
            for (&i, o) in members.iter().zip(one_per_user(answer, members.len())?) {
                outcomes[i] = o;
            }
        }
        if cluster {
            // The email step of the documents written (of every bucket whose state had not
            // moved: those are written whatever happens to the others), then their marks.
            let mut ops = Vec::new();
            let mut marks = Vec::new();
            for ((previous, next), o) in changes.iter().zip(&outcomes) {
                if *o != 1 && *o != 2 {
                    continue;
                }
                if !next.deleted {
                    ops.push(EmailOp {
                        key: redis_email_key(prefix, generation, &next.email),
                        op: "s",
                        id: next.id,
                    });
                }
                let old = old_email(previous, next);
                if !old.is_empty() {
                    ops.push(EmailOp {
                        key: redis_email_key(prefix, generation, &old),
                        op: "d",
                        id: next.id,
                    });
                }
                if *o == 1 {
                    marks.push((
                        user_bucket(next.id),
                        mark_key(prefix, generation, next.id),
                        mark_value(next.version, &old),
                    ));
                }
            }
            email_step(&self.views.conn, ops).await?;
            clear_marks(&self.views.conn, marks).await?;
        }
        // The state moved: the next live batch reads it again.
        if moved {
            *self.views.known.lock().unwrap_or_else(|e| e.into_inner()) = None;
            return Ok(Written::GenerationsMoved);
        }
        if let Some(mut remembered) = self.remembered() {
            for ((_, next), outcome) in changes.iter().zip(&outcomes) {
                if *outcome == 1 {
                    remembered.remember(generation, next.clone());
                }
            }
        }
        Ok(Written::Users(
            outcomes.into_iter().map(|o| o >= 0).collect(),
        ))
    }

    async fn commit(self: Box<Self>, _offsets: &Offsets) -> Result<(), PortError> {
        Ok(())
    }
}

/// A stored user document.
fn parse_document(doc: &str) -> Result<UserView, PortError> {
    serde_json::from_str(doc).map_err(|e| PortError::Internal(format!("user document: {e}")))
}

/// The Redis user view with its generations.
#[derive(Clone)]
pub struct RedisUserViews {
    conn: RedisConnection,
    prefix: String,
    /// The generation state as live writes last found it. Every live write is checked
    /// against the stored state in its script, so a stale one costs a retry, not a wrong
    /// write; and a batch needs no round trip to read the state first.
    known: Arc<std::sync::Mutex<Option<GenerationState>>>,
    /// The documents live writes wrote last.
    remembered: Arc<std::sync::Mutex<Remembered>>,
}

impl RedisUserViews {
    /// The view over a connection made already.
    pub fn with_connection(conn: RedisConnection, prefix: impl Into<String>) -> Self {
        Self {
            conn,
            prefix: prefix.into(),
            known: Default::default(),
            remembered: Default::default(),
        }
    }

    /// Connects to Redis at `url` (one server, or comma-separated cluster seeds); fails if
    /// Redis does not answer.
    pub async fn connect(url: &str, prefix: impl Into<String>) -> Result<Self, PortError> {
        let conn = RedisConnection::connect(url, Default::default())
            .await
            .map_err(pcf_adapters::redis::port_error)?;
        Ok(Self::with_connection(conn, prefix))
    }

    /// The view of Redis at `url`, connecting on its first use instead of now, so that a
    /// projector process starts while Redis is down: until Redis answers, every call fails
    /// as unavailable (and each failure has the connection try again). Fails only for a
    /// malformed URL.
    pub fn connect_lazily(url: &str, prefix: impl Into<String>) -> Result<Self, PortError> {
        let conn = RedisConnection::connect_lazily(url, Default::default())
            .map_err(pcf_adapters::redis::port_error)?;
        Ok(Self::with_connection(conn, prefix))
    }

    /// The connection this view writes with.
    pub fn connection(&self) -> &RedisConnection {
        &self.conn
    }

    /// A user's document in one generation, as stored (tombstones included).
    pub async fn document(&self, generation: u64, id: Uuid) -> Result<Option<UserView>, PortError> {
        let key = redis_user_key(&self.prefix, generation, id);
        let doc: Option<String> = self
            .conn
            .clone()
            .get(key)
            .await
            .map_err(pcf_adapters::redis::port_error)?;
        doc.as_deref().map(parse_document).transpose()
    }

    /// The generation state as live writes last found it, read from Redis when not known.
    async fn known_state(&self) -> Result<GenerationState, PortError> {
        let known = *self.known.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(state) = known {
            return Ok(state);
        }
        let state = self.state().await?;
        *self.known.lock().unwrap_or_else(|e| e.into_inner()) = Some(state);
        Ok(state)
    }

    /// Succeeds when Redis answers.
    pub async fn ping(&self) -> Result<(), PortError> {
        pcf_adapters::redis::ping(&self.conn).await
    }

    /// Calls `script` in every bucket with its state keys (active, building) and `args`: on
    /// one server in one atomic pipeline, on a cluster a call per bucket, concurrently (and
    /// complete when every call is).
    async fn in_every_bucket(&self, script: &Script, args: &[String]) -> Result<(), PortError> {
        let call = |pipe: &mut redis::Pipeline, bucket: u32| {
            let call = pipe
                .cmd("EVALSHA")
                .arg(script.get_hash())
                .arg(2)
                .arg(redis_active_key(&self.prefix, bucket))
                .arg(redis_building_key(&self.prefix, bucket));
            for a in args {
                call.arg(a);
            }
        };
        if self.conn.is_cluster() {
            let pipes: Vec<redis::Pipeline> = (0..REDIS_BUCKETS)
                .map(|b| {
                    let mut pipe = redis::pipe();
                    call(&mut pipe, b);
                    pipe
                })
                .collect();
            query_each(&self.conn, script, &pipes).await?;
        } else {
            let mut pipe = redis::pipe();
            pipe.atomic();
            for b in 0..REDIS_BUCKETS {
                call(&mut pipe, b);
            }
            // MULTI refuses the whole transaction when a script is missing: load first.
            script
                .prepare_invoke()
                .load_async(&mut self.conn.clone())
                .await
                .map_err(pcf_adapters::redis::port_error)?;
            query_scripts(&self.conn, script, &pipe).await?;
        }
        Ok(())
    }

    /// Every bucket's copy of the generation state.
    async fn bucket_states(&self) -> Result<Vec<(u64, Option<u64>)>, PortError> {
        let keys: Vec<String> = (0..REDIS_BUCKETS)
            .flat_map(|b| {
                [
                    redis_active_key(&self.prefix, b),
                    redis_building_key(&self.prefix, b),
                ]
            })
            .collect();
        let values: Vec<Option<u64>> = redis::cmd("MGET")
            .arg(keys)
            .query_async(&mut self.conn.clone())
            .await
            .map_err(pcf_adapters::redis::port_error)?;
        Ok(values
            .chunks(2)
            .map(|pair| (pair[0].unwrap_or(1), pair.get(1).copied().flatten()))
            .collect())
    }
}

#[async_trait]
impl ViewStore for RedisUserViews {
    fn name(&self) -> &str {
        "users-redis"
    }

    /// The generation state, the same in every bucket. Where the buckets differ a begin or
    /// a switch was interrupted (on a cluster they change bucket by bucket); it is finished
    /// here, each bucket only if it is still as the interrupted step left it.
    async fn state(&self) -> Result<GenerationState, PortError> {
        let mut states = Vec::new();
        for _ in 0..3 {
            states = self.bucket_states().await?;
            let (active, building) = states[0];
            if states.iter().all(|s| *s == (active, building)) {
                return Ok(GenerationState { active, building });
            }
            let newest = states.iter().map(|s| s.0).max().unwrap_or(active);
            if states.iter().any(|s| s.0 != newest) {
                tracing::warn!(
                    generation = newest,
                    "finishing an interrupted switch of the Redis view"
                );
                self.in_every_bucket(&FINISH_SWITCH, &[newest.to_string()])
                    .await?;
                continue;
            }
            if let Some(build) = states.iter().filter_map(|s| s.1).max() {
                tracing::warn!(
                    generation = build,
                    "finishing an interrupted begin of the Redis view"
                );
                self.in_every_bucket(&FINISH_BEGIN, &[newest.to_string(), build.to_string()])
                    .await?;
            }
        }
        // Still disagreeing: not a step cut off, but buckets that lost their keys (a shard
        // of a cluster without persistence lost its primary and replicas). The newest state
        // is answered, so that a rebuild (`begin` sets every bucket, `switch` too) repairs
        // the view; meanwhile live writes into those buckets are refused.
        let active = states.iter().map(|s| s.0).max().unwrap_or(1);
        let building = states.iter().filter_map(|s| s.1).max();
        tracing::error!(
            active,
            ?building,
            "the Redis view's buckets disagree on the generation state (lost keys?); \
             rebuild the view: pcf projections rebuild users-redis"
        );
        Ok(GenerationState { active, building })
    }

    async fn begin(&self, generation: u64) -> Result<(), PortError> {
        // Leftovers of an interrupted build of the same number go first.
        self.drop_generation(generation).await?;
        let active = self.state().await?.active;
        // Every bucket before the rebuild reads the log.
        self.in_every_bucket(&BEGIN, &[active.to_string(), generation.to_string()])
            .await
    }

    async fn switch(&self, generation: u64) -> Result<(), PortError> {
        self.in_every_bucket(&SWITCH, &[generation.to_string()])
            .await
    }

    async fn drop_generation(&self, generation: u64) -> Result<(), PortError> {
        let pattern = redis_generation_pattern(&self.prefix, generation);
        delete_matching(&self.conn, &pattern)
            .await
            .map_err(pcf_adapters::redis::port_error)
    }

    /// A live batch carries the generation state it was opened with (as live writes last
    /// found it: no round trip when known) into every script, which refuses it once `begin`
    /// or `switch` changed that state (in its bucket); users are folded on the documents
    /// live writes wrote last where they are remembered (see `Remembered`).
    async fn open(&self, scope: Scope) -> Result<Box<dyn ViewBatch + '_>, PortError> {
        let generations = BatchGenerations::of(scope, self.known_state()).await?;
        Ok(Box::new(RedisBatch {
            views: self,
            generations,
        }))
    }
}
