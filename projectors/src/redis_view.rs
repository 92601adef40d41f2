//! The Redis user view: one JSON document per user plus an email index, under a generation
//! prefix; every change of a user is one atomic script guarded by the user's version.

use async_trait::async_trait;
use pcf_domain::ports::PortError;
use pcf_domain::read_model::{
    redis_active_key, redis_building_key, redis_email_key, redis_generation_prefix, redis_user_key,
};
use pcf_domain::UserView;
use redis::aio::ConnectionManager;
use redis::{AsyncCommands, Script};
use std::collections::HashMap;
use std::sync::{Arc, LazyLock};
use uuid::Uuid;

use crate::store::{
    BatchGenerations, GenerationState, Offsets, Scope, ViewBatch, ViewStore, Written,
};

/// Replaces users' documents where each is still at the version it was folded from, and
/// moves their email entries: one call for many users. Per user, at KEYS[3+3i] (document),
/// KEYS[4+3i] (new email entry, '' for none), KEYS[5+3i] (old email entry, '' for none) and
/// ARGV[3+4i] (document), ARGV[4+4i] (its version), ARGV[5+4i] (the version it was folded
/// from), ARGV[6+4i] (the user's id); the outcome for each: 1 written, 0 the stored one is
/// already as new, -1 it moved since it was read. With the state's keys (KEYS[1], building,
/// and KEYS[2], active), the writes happen only while the generation state is still the one
/// the writer knows (ARGV[1] and ARGV[2], '' for none); else the only outcome is -2: the
/// state moved (a rebuild began or switched) and the batch must be written again for the
/// new state.
static REPLACE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
if KEYS[1] ~= '' then
  if (redis.call('GET', KEYS[1]) or '') ~= ARGV[1] then return {-2} end
  if (redis.call('GET', KEYS[2]) or '1') ~= ARGV[2] then return {-2} end
end
local outcomes = {}
for i = 0, (#KEYS - 2) / 3 - 1 do
  local k = 3 + 3 * i
  local a = 3 + 4 * i
  local current = redis.call('GET', KEYS[k])
  local stored = 0
  if current then stored = tonumber(cjson.decode(current)['version']) end
  local outcome = 1
  if tonumber(ARGV[a + 1]) <= stored then
    outcome = 0
  elseif stored ~= tonumber(ARGV[a + 2]) then
    outcome = -1
  else
    if KEYS[k + 2] ~= '' and redis.call('GET', KEYS[k + 2]) == ARGV[a + 3] then
      redis.call('DEL', KEYS[k + 2])
    end
    if KEYS[k + 1] ~= '' then redis.call('SET', KEYS[k + 1], ARGV[a + 3]) end
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

/// Writes the documents of users that have none yet (`SET NX`), with their email entries:
/// one call for many users, KEYS[2i+1] (document) and KEYS[2i+2] (email entry, '' for
/// none) with ARGV[2i+1] (document) and ARGV[2i+2] (the user's id). For each: 1 written,
/// 0 the user has a document already (left as it is, for the guarded script to decide).
static FILL: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local outcomes = {}
for i = 1, #KEYS, 2 do
  local outcome = 0
  if redis.call('SET', KEYS[i], ARGV[i], 'NX') then
    if KEYS[i + 1] ~= '' then redis.call('SET', KEYS[i + 1], ARGV[i + 1]) end
    outcome = 1
  end
  outcomes[(i + 1) / 2] = outcome
end
return outcomes
"#,
    )
});

/// Sends `pipe` (calls of `script`, each answering a list of outcomes), loading the script
/// first if Redis has forgotten it (a restart); the outcomes of all the calls, in order.
async fn query_scripts(
    conn: &ConnectionManager,
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

/// Deletes every key matching `pattern`, a page of `SCAN` at a time (`UNLINK`: Redis frees
/// the values in the background).
pub async fn delete_matching(
    conn: &mut ConnectionManager,
    pattern: &str,
) -> redis::RedisResult<()> {
    let mut cursor: u64 = 0;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(conn)
            .await?;
        if !keys.is_empty() {
            let _: () = redis::cmd("UNLINK").arg(&keys).query_async(conn).await?;
        }
        if next == 0 {
            return Ok(());
        }
        cursor = next;
    }
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

impl RedisBatch<'_> {
    /// The email entry a user's document owns ('' for a tombstone, which owns none).
    fn email_key(&self, generation: u64, user: &UserView) -> String {
        if user.deleted {
            String::new()
        } else {
            redis_email_key(&self.views.prefix, generation, &user.email)
        }
    }

    fn remembered(&self) -> Option<std::sync::MutexGuard<'_, Remembered>> {
        self.generations.opened_with().is_some().then(|| {
            self.views
                .remembered
                .lock()
                .unwrap_or_else(|e| e.into_inner())
        })
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
        let keys: Vec<String> = unknown
            .iter()
            .map(|id| redis_user_key(&self.views.prefix, generation, *id))
            .collect();
        let docs: Vec<Option<String>> = redis::cmd("MGET")
            .arg(keys)
            .query_async(&mut self.views.conn.clone())
            .await
            .map_err(pcf_adapters::redis::port_error)?;
        for (id, doc) in unknown.iter().zip(docs) {
            if let Some(doc) = doc {
                found.insert(*id, parse_document(&doc)?);
            }
        }
        Ok(found)
    }

    /// Users without a document get theirs in one pipeline (`FILL`): a rebuild writes
    /// mostly those. Only for batches of one generation (a rebuild's): live writes go
    /// through the guarded script, which checks the generation state.
    #[tracing::instrument(level = "debug", name = "redis.write", skip_all, fields(generation = generation, users = states.len()))]
    async fn write_newer(
        &mut self,
        generation: u64,
        states: &[UserView],
    ) -> Result<Vec<bool>, PortError> {
        if self.generations.opened_with().is_some() || states.is_empty() {
            return Ok(vec![false; states.len()]);
        }
        let mut pipe = redis::pipe();
        for chunk in states.chunks(USERS_PER_CALL) {
            let call = pipe
                .cmd("EVALSHA")
                .arg(FILL.get_hash())
                .arg(2 * chunk.len());
            for state in chunk {
                call.arg(redis_user_key(&self.views.prefix, generation, state.id))
                    .arg(self.email_key(generation, state));
            }
            for state in chunk {
                call.arg(document(state)?).arg(state.id.to_string());
            }
        }
        let outcomes = query_scripts(&self.views.conn, &FILL, &pipe).await?;
        Ok(one_per_user(outcomes, states.len())?
            .into_iter()
            .map(|o| o == 1)
            .collect())
    }

    /// One pipeline of the guarded script, a call per `USERS_PER_CALL` users.
    #[tracing::instrument(level = "debug", name = "redis.write", skip_all, fields(generation = generation, users = changes.len()))]
    async fn replace(
        &mut self,
        generation: u64,
        changes: &[(Option<UserView>, UserView)],
    ) -> Result<Written, PortError> {
        if changes.is_empty() {
            return Ok(Written::Users(Vec::new()));
        }
        let prefix = &self.views.prefix;
        let (building_key, active_key, expected_building, expected_active) =
            match self.generations.opened_with() {
                Some(state) => (
                    redis_building_key(prefix),
                    redis_active_key(prefix),
                    state.building.map(|b| b.to_string()).unwrap_or_default(),
                    state.active.to_string(),
                ),
                None => Default::default(),
            };
        let mut pipe = redis::pipe();
        for chunk in changes.chunks(USERS_PER_CALL) {
            let call = pipe
                .cmd("EVALSHA")
                .arg(REPLACE.get_hash())
                .arg(2 + 3 * chunk.len())
                .arg(&building_key)
                .arg(&active_key);
            for (previous, next) in chunk {
                let old_email = match previous {
                    Some(p) if !p.deleted && (p.email != next.email || next.deleted) => {
                        redis_email_key(prefix, generation, &p.email)
                    }
                    _ => String::new(),
                };
                call.arg(redis_user_key(prefix, generation, next.id))
                    .arg(self.email_key(generation, next))
                    .arg(old_email);
            }
            call.arg(&expected_building).arg(&expected_active);
            for (previous, next) in chunk {
                call.arg(document(next)?)
                    .arg(next.version)
                    .arg(previous.as_ref().map_or(0, |p| p.version))
                    .arg(next.id.to_string());
            }
        }
        // Whatever happens to this write, what was remembered of these users may be out of
        // date after it; only a document written is remembered again.
        if let Some(mut remembered) = self.remembered() {
            for (_, next) in changes {
                remembered.views.remove(&(generation, next.id));
            }
        }
        let outcomes = query_scripts(&self.views.conn, &REPLACE, &pipe).await?;
        // The state moved: a call answers only that. The next live batch reads it again.
        if outcomes.contains(&-2) {
            *self.views.known.lock().unwrap_or_else(|e| e.into_inner()) = None;
            return Ok(Written::GenerationsMoved);
        }
        let outcomes = one_per_user(outcomes, changes.len())?;
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
    conn: ConnectionManager,
    prefix: String,
    /// The generation state as live writes last found it. Every live write is checked
    /// against the stored state in its script, so a stale one costs a retry, not a wrong
    /// write; and a batch needs no round trip to read the state first.
    known: Arc<std::sync::Mutex<Option<GenerationState>>>,
    /// The documents live writes wrote last.
    remembered: Arc<std::sync::Mutex<Remembered>>,
}

impl RedisUserViews {
    fn with_connection(conn: ConnectionManager, prefix: String) -> Self {
        Self {
            conn,
            prefix,
            known: Default::default(),
            remembered: Default::default(),
        }
    }

    /// Connects to Redis at `url`; fails if Redis does not answer.
    pub async fn connect(url: &str, prefix: impl Into<String>) -> Result<Self, PortError> {
        let client = redis::Client::open(url).map_err(pcf_adapters::redis::port_error)?;
        let conn = ConnectionManager::new(client)
            .await
            .map_err(pcf_adapters::redis::port_error)?;
        Ok(Self::with_connection(conn, prefix.into()))
    }

    /// The view of Redis at `url`, connecting on its first use instead of now, so that a
    /// projector process starts while Redis is down: until Redis answers, every call fails
    /// as unavailable (and each failure has the connection manager try again). Fails only
    /// for a malformed URL.
    pub fn connect_lazily(url: &str, prefix: impl Into<String>) -> Result<Self, PortError> {
        let client = redis::Client::open(url).map_err(pcf_adapters::redis::port_error)?;
        let conn = ConnectionManager::new_lazy_with_config(
            client,
            redis::aio::ConnectionManagerConfig::new(),
        )
        .map_err(pcf_adapters::redis::port_error)?;
        Ok(Self::with_connection(conn, prefix.into()))
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
}

#[async_trait]
impl ViewStore for RedisUserViews {
    fn name(&self) -> &str {
        "users-redis"
    }

    async fn state(&self) -> Result<GenerationState, PortError> {
        let (active, building): (Option<u64>, Option<u64>) = redis::pipe()
            .get(redis_active_key(&self.prefix))
            .get(redis_building_key(&self.prefix))
            .query_async(&mut self.conn.clone())
            .await
            .map_err(pcf_adapters::redis::port_error)?;
        Ok(GenerationState {
            active: active.unwrap_or(1),
            building,
        })
    }

    async fn begin(&self, generation: u64) -> Result<(), PortError> {
        // Leftovers of an interrupted build of the same number go first.
        self.drop_generation(generation).await?;
        let mut conn = self.conn.clone();
        let active = self.state().await?.active;
        redis::pipe()
            .atomic()
            .set_nx(redis_active_key(&self.prefix), active)
            .set(redis_building_key(&self.prefix), generation)
            .query_async::<()>(&mut conn)
            .await
            .map_err(pcf_adapters::redis::port_error)
    }

    async fn switch(&self, generation: u64) -> Result<(), PortError> {
        redis::pipe()
            .atomic()
            .set(redis_active_key(&self.prefix), generation)
            .del(redis_building_key(&self.prefix))
            .query_async::<()>(&mut self.conn.clone())
            .await
            .map_err(pcf_adapters::redis::port_error)
    }

    async fn drop_generation(&self, generation: u64) -> Result<(), PortError> {
        let pattern = format!("{}*", redis_generation_prefix(&self.prefix, generation));
        let mut conn = self.conn.clone();
        delete_matching(&mut conn, &pattern)
            .await
            .map_err(pcf_adapters::redis::port_error)
    }

    /// A live batch carries the generation state it was opened with (as live writes last
    /// found it: no round trip when known) into every script, which refuses it once `begin`
    /// or `switch` changed that state; users are folded on the documents live writes wrote
    /// last where they are remembered (see `Remembered`).
    async fn open(&self, scope: Scope) -> Result<Box<dyn ViewBatch + '_>, PortError> {
        let generations = BatchGenerations::of(scope, self.known_state()).await?;
        Ok(Box::new(RedisBatch {
            views: self,
            generations,
        }))
    }
}
