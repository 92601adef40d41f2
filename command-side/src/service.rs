//! Command execution: load the user, let the aggregate decide, append in one transaction,
//! retry on a concurrent append, and answer a repeated command id with its first result (when
//! the repeat is the same caller's same command, and the result is still the caller's to
//! read).

use async_trait::async_trait;
use cqrs_es::event_sink::EventSink;
use cqrs_es::Aggregate;
use pcf_domain::ports::{CommandObserver, EmailDirectory, PortError};
use pcf_domain::{Email, EventMetadata, User, UserCommand, UserError, UserServices};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Mutex;
use tracing::Instrument;
use uuid::Uuid;

use crate::idempotency::fingerprint;
pub use crate::idempotency::Caller;
pub use crate::store::CommandResult;
use crate::store::{AppendError, AppendRequest, CommandStore, StoreError};

/// How often a command without `expectedVersion` is retried after losing a race.
const MAX_ATTEMPTS: u32 = 50;
/// Per-user locks are striped: enough stripes that unrelated users rarely share one.
const LOCK_STRIPES: usize = 1024;
/// Users whose state each stripe remembers after a command (see `Stripe`): 64 × 1024 users
/// in all, some tens of megabytes at most (a few hundred bytes a user, more with long
/// bios).
const REMEMBERED_PER_STRIPE: usize = 64;

/// Why a command did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error(transparent)]
    Rejected(#[from] UserError),
    /// Retries ran out while other writers kept changing the user.
    #[error("the user is changing too fast; try again")]
    Contended,
    /// The command id was used before by another caller, or for another command, target or
    /// input; nothing ran.
    #[error("this commandId was used for another command; send a new one")]
    IdempotencyKeyReused,
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl CommandError {
    /// The outcome label metrics use.
    pub fn outcome(&self) -> &'static str {
        match self {
            Self::Rejected(e) => e.code().as_str(),
            Self::Contended => "CONFLICT",
            Self::IdempotencyKeyReused => "IDEMPOTENCY_KEY_REUSED",
            Self::Store(StoreError::Unavailable(_)) => "UNAVAILABLE",
            Self::Store(StoreError::Internal(_)) => "INTERNAL",
        }
    }
}

/// The email directory of a command's first attempt: it knows of no owner, so the check is
/// left to the append, where the email index's primary key decides anyway (and under
/// concurrency, only it can). An append refused for a taken email is tried again with the
/// real directory, which then gives the aggregate's answer. This spares a round trip per
/// command that claims an email.
struct UncheckedEmails;

#[async_trait]
impl EmailDirectory for UncheckedEmails {
    async fn owner_of(&self, _: &Email) -> Result<Option<Uuid>, PortError> {
        Ok(None)
    }
}

/// Executes commands against the event store (its command role: `CommandStore`).
pub struct CommandService {
    store: Arc<dyn CommandStore>,
    services: UserServices,
    /// The services of a first attempt (see `UncheckedEmails`).
    optimistic: UserServices,
    observer: Arc<dyn CommandObserver>,
    // Commands on one user in this process run one at a time, so they do not race each
    // other to the same sequence number; other processes are handled by the retry.
    stripes: Vec<Mutex<Stripe>>,
}

/// One lock stripe, and the state of the users this process last wrote under it.
///
/// A remembered state is only a guess: another process may have appended since. A first
/// attempt decides on it and appends after its sequence; if that sequence is taken the
/// append is refused as a conflict and the user is loaded. A command the guess refuses or
/// finds nothing to do for is decided again on the loaded user, so a stale guess can cost
/// a round trip but never change an answer. It spares the load of a command on a user
/// written here before: `updateProfile` is then one round trip.
#[derive(Default)]
struct Stripe {
    users: HashMap<Uuid, (User, u64)>,
}

impl Stripe {
    fn remember(&mut self, user_id: Uuid, user: User, sequence: u64) {
        if self.users.len() >= REMEMBERED_PER_STRIPE && !self.users.contains_key(&user_id) {
            // Forget one other user; which one matters little, as any may be stale anyway.
            if let Some(other) = self.users.keys().next().copied() {
                self.users.remove(&other);
            }
        }
        self.users.insert(user_id, (user, sequence));
    }
}

impl CommandService {
    pub fn new(store: Arc<dyn CommandStore>, observer: Arc<dyn CommandObserver>) -> Self {
        let services = UserServices {
            emails: store.clone(),
        };
        Self {
            store,
            services,
            optimistic: UserServices {
                emails: Arc::new(UncheckedEmails),
            },
            observer,
            stripes: (0..LOCK_STRIPES)
                .map(|_| Mutex::new(Stripe::default()))
                .collect(),
        }
    }

    pub fn store(&self) -> &Arc<dyn CommandStore> {
        &self.store
    }

    /// Executes `command` on user `user_id`, for the caller that `metadata.actor` names
    /// (anonymous when none): for callers inside the process, such as tools and tests. The
    /// API says who the caller is with `execute_as`.
    pub async fn execute(
        &self,
        user_id: Uuid,
        command: UserCommand,
        metadata: EventMetadata,
    ) -> Result<CommandResult, CommandError> {
        let caller = Caller::from_subject(metadata.actor.as_deref());
        self.execute_as(&caller, user_id, command, metadata).await
    }

    /// Executes `command` on user `user_id` for `caller`, whose command ids it is: a command
    /// id already used answers with its first result only for the same caller's same
    /// command, target and input, and is refused for anything else.
    pub async fn execute_as(
        &self,
        caller: &Caller,
        user_id: Uuid,
        command: UserCommand,
        metadata: EventMetadata,
    ) -> Result<CommandResult, CommandError> {
        let name = command.name();
        let span = tracing::info_span!("command", command = name, user = %user_id,
            command_id = metadata.command_id.as_deref().unwrap_or(""));
        let started = Instant::now();
        let key = metadata.command_id.as_ref().map(|command_id| CommandKey {
            command_id: command_id.clone(),
            fingerprint: fingerprint(caller, user_id, &command),
            deletes_account: matches!(command, UserCommand::DeleteAccount { .. }),
        });
        let result = self
            .execute_inner(user_id, command, &metadata, key.as_ref())
            .instrument(span)
            .await;
        let outcome = match &result {
            Ok(_) => "OK",
            Err(e) => e.outcome(),
        };
        self.observer
            .command_finished(name, outcome, started.elapsed());
        result
    }

    // One loop of about a hundred lines on purpose: each attempt's state (careful or not,
    // the remembered user, the stripe's lock) carries into the next, and the loop reads as
    // the decision it makes; split, those would be passed back and forth.
    async fn execute_inner(
        &self,
        user_id: Uuid,
        command: UserCommand,
        metadata: &EventMetadata,
        key: Option<&CommandKey>,
    ) -> Result<CommandResult, CommandError> {
        let stripe = (user_id.as_u128() % LOCK_STRIPES as u128) as usize;
        let mut stripe = self.stripes[stripe].lock().await;
        // The first attempt is optimistic: it assumes the command has not run before, the
        // email is free, and the user is as this process last wrote it (or, for
        // `createUser`, whose id was just made, that the user has no events), and leaves
        // all of it to the append's unique constraints. Whatever they refuse is decided
        // again carefully: the command id looked up, the user loaded, the email asked of
        // the directory.
        let mut careful = false;
        for attempt in 0..MAX_ATTEMPTS {
            if careful {
                if let Some(previous) = self.previous_result(key).await? {
                    return Ok(previous);
                }
            }
            let remembered = if careful {
                None
            } else {
                stripe.users.get(&user_id).cloned()
            };
            let guessed = remembered.is_some();
            let (mut user, sequence) = match remembered {
                Some(state) => state,
                None if !careful && matches!(command, UserCommand::CreateUser { .. }) => {
                    (User::default(), 0)
                }
                None => {
                    self.store
                        .load(user_id)
                        .instrument(tracing::debug_span!("load"))
                        .await?
                }
            };
            let services = if careful {
                &self.services
            } else {
                &self.optimistic
            };
            let sink = EventSink::default();
            let decided = user
                .handle(command.clone(), services, &sink)
                .instrument(tracing::debug_span!("decide"))
                .await;
            let events = sink.collect().await;
            if guessed && (decided.is_err() || events.is_empty()) {
                // Refused, or nothing to do, on a remembered state that may be stale:
                // decide again on the stored one before answering.
                stripe.users.remove(&user_id);
                careful = true;
                continue;
            }
            if let Err(rejection) = decided {
                // The same command may have committed before (its email claim is what we
                // now see as taken, or the change it made is why it is refused): answer
                // with its result.
                return self.first_result_or(key, rejection).await;
            }
            if events.is_empty() {
                // Nothing changes: answer with the first result of a repeated command, or
                // the current state (unless the command id is another command's).
                if let Some(previous) = self.previous_result(key).await? {
                    return Ok(previous);
                }
                let position = self.store.position_of(user_id, sequence).await?;
                return Ok(CommandResult {
                    user_id,
                    user: user.view().cloned(),
                    version: user.version(),
                    position,
                    key_destroyed_at: None,
                });
            }
            // The events carry the trace context of the span that appends them.
            let span = tracing::debug_span!("append", events = events.len());
            let traced;
            let metadata = match pcf_adapters::trace::traceparent_of(&span) {
                Some(traceparent) => {
                    traced = EventMetadata {
                        traceparent: Some(traceparent),
                        ..metadata.clone()
                    };
                    &traced
                }
                None => metadata,
            };
            let request = AppendRequest {
                user_id,
                expected_sequence: sequence,
                events: &events,
                metadata,
                fingerprint: key.map(|k| k.fingerprint.as_str()),
                user_after: user.view(),
            };
            match self.store.append(request).instrument(span).await {
                Ok(result) => {
                    tracing::debug!(
                        events = events.len(),
                        version = result.version,
                        "command committed"
                    );
                    stripe.remember(user_id, user, sequence + events.len() as u64);
                    return Ok(result);
                }
                // Lost a race with another writer, or the same command id ran elsewhere:
                // reload and decide again. With an `expectedVersion` the aggregate now
                // answers CONFLICT; a repeated command id now finds its first result.
                Err(AppendError::Conflict) | Err(AppendError::DuplicateCommand) => {
                    tracing::debug!(attempt, "append lost a race; retrying");
                    stripe.users.remove(&user_id);
                    if careful {
                        backoff(attempt).await;
                    }
                    careful = true;
                }
                // Decided again with the directory: the aggregate gives the answer (or the
                // command's first result, if it ran before).
                Err(AppendError::EmailTaken) if !careful => careful = true,
                Err(AppendError::EmailTaken) => {
                    return self.first_result_or(key, UserError::EmailTaken).await;
                }
                Err(AppendError::Store(e)) => {
                    // The append may have committed before the error reached us.
                    stripe.users.remove(&user_id);
                    return Err(e.into());
                }
            }
        }
        Err(CommandError::Contended)
    }

    /// The stored result of this command if it already ran, else `rejection`.
    async fn first_result_or(
        &self,
        key: Option<&CommandKey>,
        rejection: UserError,
    ) -> Result<CommandResult, CommandError> {
        match self.previous_result(key).await? {
            Some(previous) => Ok(previous),
            None => Err(rejection.into()),
        }
    }

    /// The first result of the command id in `key`, if it was used before; every answer
    /// from a stored result goes through here. The result is given only to the same
    /// caller's same command (else `IdempotencyKeyReused`), and only while its user still
    /// has an account: the stored result holds the user's personal data as it was then,
    /// which no one may read once the account is deleted. Only the deletion itself, whose
    /// answer holds none, is still answered. A result past `COMMAND_ID_RETENTION` is
    /// forgotten, and the command runs as new.
    async fn previous_result(
        &self,
        key: Option<&CommandKey>,
    ) -> Result<Option<CommandResult>, CommandError> {
        let Some(key) = key else {
            return Ok(None);
        };
        let Some(stored) = self.store.find_command(&key.command_id).await? else {
            return Ok(None);
        };
        if stored.expired {
            // Its row would refuse this command's own record of the id: remove it (only if
            // still expired, so a concurrent repeat's fresh record stays).
            self.store.forget_expired_command(&key.command_id).await?;
            return Ok(None);
        }
        // A record from before fingerprints were kept matches nothing.
        if stored.fingerprint.as_deref() != Some(key.fingerprint.as_str()) {
            return Err(CommandError::IdempotencyKeyReused);
        }
        if !key.deletes_account {
            let (user, _) = self.store.load(stored.result.user_id).await?;
            match user.view() {
                Some(view) if !view.deleted => {}
                Some(_) => return Err(UserError::AccountDeleted.into()),
                None => return Err(UserError::NotFound.into()),
            }
        }
        Ok(Some(stored.result))
    }
}

/// A command's id and what it must match to be answered with a stored result.
struct CommandKey {
    command_id: String,
    /// See `idempotency::fingerprint`.
    fingerprint: String,
    /// Whether the command is `deleteAccount`, whose first result stays the answer after
    /// the account is gone.
    deletes_account: bool,
}

/// A short, growing, jittered pause so that racing writers spread out.
async fn backoff(attempt: u32) {
    let base = 2u64.saturating_pow(attempt.min(6)); // up to 64 ms
    let jitter = Uuid::new_v4().as_u128() as u64 % (base + 1);
    tokio::time::sleep(Duration::from_millis(base / 2 + jitter)).await;
}
