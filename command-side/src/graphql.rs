//! The GraphQL `MutationRoot`: the four commands of the public contract.
//!
//! The mutation payload's `user` field uses the query side's `User` type, which this crate
//! cannot name (the two sides share only the domain); the binary supplies it as `U`.

use async_graphql::{Context, InputObject, MaybeUndefined, Object, OutputType, ID};
use chrono::Utc;
use pcf_adapters::errors;
use pcf_domain::auth::Principal;
use pcf_domain::ports::PortError;
use pcf_domain::{ErrorCode, EventMetadata, ProfilePatch, UserCommand, UserError, UserView};
use std::marker::PhantomData;
use std::sync::Arc;
use uuid::Uuid;

use crate::service::{Caller, CommandError, CommandResult, CommandService};

/// Who is calling and why, put into the request's data by the HTTP layer.
#[derive(Debug, Clone, Default)]
pub struct CommandContext {
    pub correlation_id: Option<String>,
    pub actor: Option<String>,
}

/// The input of `createUser`.
#[derive(InputObject)]
pub struct CreateUserInput {
    pub email: String,
    pub display_name: String,
    pub bio: Option<String>,
    pub avatar_url: Option<String>,
}

/// The input of `updateProfile`: an absent field is left alone; `null` clears `bio` and
/// `avatarUrl`.
#[derive(InputObject)]
pub struct UpdateProfileInput {
    pub display_name: Option<String>,
    pub bio: MaybeUndefined<String>,
    pub avatar_url: MaybeUndefined<String>,
}

/// The result of a command that leaves a user.
pub struct UserPayload<U> {
    result: CommandResult,
    _user: PhantomData<U>,
}

#[Object(name = "UserPayload")]
impl<U> UserPayload<U>
where
    U: OutputType + From<UserView> + Send + Sync + 'static,
{
    /// The user after the command.
    async fn user(&self) -> async_graphql::Result<U> {
        self.result
            .user
            .clone()
            .map(U::from)
            .ok_or_else(|| error(ErrorCode::Internal, "the command left no user"))
    }

    /// The user's version after the command; pass it as `minVersion` to read your write.
    async fn version(&self) -> i64 {
        self.result.version as i64
    }

    /// The position of the command's last event in the log.
    async fn position(&self) -> String {
        self.result.position.to_string()
    }
}

/// The result of `deleteAccount`.
pub struct DeleteAccountPayload(CommandResult);

#[Object]
impl DeleteAccountPayload {
    async fn id(&self) -> ID {
        ID(self.0.user_id.to_string())
    }

    async fn version(&self) -> i64 {
        self.0.version as i64
    }

    async fn position(&self) -> String {
        self.0.position.to_string()
    }

    /// The erasure receipt: the user's data key was destroyed, so the personal data sealed in
    /// the user's events (in the event store, its replicas, Kafka and backups taken from now
    /// on) can no longer be opened. Null when the account had no key (created before
    /// personal data was sealed; `pcf events protect` erases its older events).
    async fn erasure(&self) -> Option<ErasureReceipt> {
        self.0.key_destroyed_at.map(|at| ErasureReceipt {
            position: self.0.position.to_string(),
            key_destroyed_at: at,
        })
    }
}

/// Proof that a deleted account's personal data can no longer be read.
#[derive(async_graphql::SimpleObject)]
pub struct ErasureReceipt {
    /// The position of the `AccountDeleted` event, whose transaction destroyed the key.
    position: String,
    /// When the key was destroyed.
    key_destroyed_at: chrono::DateTime<Utc>,
}

/// The commands.
pub struct MutationRoot<U>(PhantomData<U>);

impl<U> Default for MutationRoot<U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

#[Object(name = "Mutation")]
impl<U> MutationRoot<U>
where
    U: OutputType + From<UserView> + Send + Sync + 'static,
{
    /// Signs up a new user. Open to anyone.
    async fn create_user(
        &self,
        ctx: &Context<'_>,
        input: CreateUserInput,
        command_id: Option<ID>,
    ) -> async_graphql::Result<UserPayload<U>> {
        let user_id = Uuid::now_v7();
        let command = UserCommand::CreateUser {
            user_id,
            email: input.email,
            display_name: input.display_name,
            bio: input.bio,
            avatar_url: input.avatar_url,
            at: Utc::now(),
        };
        run(ctx, user_id, command, command_id, Access::Anyone)
            .await
            .map(payload)
    }

    /// Changes a user's profile.
    async fn update_profile(
        &self,
        ctx: &Context<'_>,
        id: ID,
        input: UpdateProfileInput,
        expected_version: Option<i64>,
        command_id: Option<ID>,
    ) -> async_graphql::Result<UserPayload<U>> {
        let command = UserCommand::UpdateProfile {
            display_name: input.display_name,
            bio: patch(input.bio),
            avatar_url: patch(input.avatar_url),
            expected_version: version_arg(expected_version)?,
            at: Utc::now(),
        };
        change(ctx, &id, command, command_id).await.map(payload)
    }

    /// Changes a user's email address.
    async fn change_email(
        &self,
        ctx: &Context<'_>,
        id: ID,
        email: String,
        expected_version: Option<i64>,
        command_id: Option<ID>,
    ) -> async_graphql::Result<UserPayload<U>> {
        let command = UserCommand::ChangeEmail {
            email,
            expected_version: version_arg(expected_version)?,
            at: Utc::now(),
        };
        change(ctx, &id, command, command_id).await.map(payload)
    }

    /// Deletes an account; its email becomes free and its personal data leaves the views.
    async fn delete_account(
        &self,
        ctx: &Context<'_>,
        id: ID,
        expected_version: Option<i64>,
        command_id: Option<ID>,
    ) -> async_graphql::Result<DeleteAccountPayload> {
        let command = UserCommand::DeleteAccount {
            expected_version: version_arg(expected_version)?,
            at: Utc::now(),
        };
        change(ctx, &id, command, command_id)
            .await
            .map(DeleteAccountPayload)
    }
}

/// Runs a command on an existing account, for its owner or an admin.
async fn change(
    ctx: &Context<'_>,
    id: &ID,
    command: UserCommand,
    command_id: Option<ID>,
) -> async_graphql::Result<CommandResult> {
    run(ctx, user_id(id)?, command, command_id, Access::OwnerOrAdmin).await
}

fn payload<U>(result: CommandResult) -> UserPayload<U> {
    UserPayload {
        result,
        _user: PhantomData,
    }
}

fn patch(value: MaybeUndefined<String>) -> ProfilePatch {
    match value {
        MaybeUndefined::Undefined => ProfilePatch::Keep,
        MaybeUndefined::Null => ProfilePatch::Clear,
        MaybeUndefined::Value(v) => ProfilePatch::Set(v),
    }
}

fn version_arg(v: Option<i64>) -> async_graphql::Result<Option<u64>> {
    match v {
        None => Ok(None),
        Some(v) if v >= 0 => Ok(Some(v as u64)),
        Some(_) => Err(validation("expectedVersion", "must not be negative")),
    }
}

fn user_id(id: &ID) -> async_graphql::Result<Uuid> {
    // An id that cannot exist names no user.
    Uuid::parse_str(id.as_str()).map_err(|_| error(ErrorCode::NotFound, "no such user"))
}

/// Who may run a command.
enum Access {
    /// Sign-up.
    Anyone,
    /// The account's owner or an admin.
    OwnerOrAdmin,
}

async fn run(
    ctx: &Context<'_>,
    user_id: Uuid,
    command: UserCommand,
    command_id: Option<ID>,
    access: Access,
) -> async_graphql::Result<CommandResult> {
    let service = ctx.data::<Arc<CommandService>>()?;
    let caller = ctx
        .data_opt::<CommandContext>()
        .cloned()
        .unwrap_or_default();
    let principal = ctx.data_opt::<Principal>().cloned().unwrap_or_default();
    if let Access::OwnerOrAdmin = access {
        if !principal.is_authenticated() {
            return Err(error(
                ErrorCode::Unauthenticated,
                "sign in to change an account",
            ));
        }
        if !principal.may_access_user(user_id) {
            return Err(error(
                ErrorCode::Forbidden,
                "you may change only your own account",
            ));
        }
    }
    if let Some(id) = &command_id {
        if id.is_empty() || id.len() > 200 {
            return Err(validation("commandId", "must be 1 to 200 characters"));
        }
        if id.chars().any(char::is_control) {
            return Err(validation(
                "commandId",
                "must not contain control characters",
            ));
        }
    }
    // The command id is the authenticated subject's (or the anonymous sign-up's), never
    // the actor named by the context.
    let owner = Caller::from_subject(principal.subject.as_deref());
    let metadata = EventMetadata {
        correlation_id: caller.correlation_id.clone(),
        causation_id: command_id.as_ref().map(|id| id.to_string()),
        command_id: command_id.map(|id| id.0),
        actor: principal.subject.or(caller.actor),
        traceparent: None,
    };
    service
        .execute_as(&owner, user_id, command, metadata)
        .await
        .map_err(to_graphql)
}

fn validation(field: &str, message: &str) -> async_graphql::Error {
    errors::invalid(field, message)
}

fn error(code: ErrorCode, message: &str) -> async_graphql::Error {
    errors::error(code, message)
}

/// Maps a command failure to the public error: rule violations say what is wrong; store
/// failures are logged and answered without details.
fn to_graphql(e: CommandError) -> async_graphql::Error {
    match e {
        CommandError::Rejected(UserError::Validation(v)) => validation(v.field, &v.reason),
        CommandError::Rejected(UserError::Directory(detail)) => {
            errors::dependency(PortError::Unavailable(detail), "the email directory")
        }
        CommandError::Rejected(rule) => error(rule.code(), &rule.to_string()),
        CommandError::Contended => error(ErrorCode::Conflict, &e.to_string()),
        // Says nothing of the command that used the id first, nor whose it was.
        CommandError::IdempotencyKeyReused => {
            error(ErrorCode::IdempotencyKeyReused, &e.to_string())
        }
        CommandError::Store(e) => errors::dependency(e.into(), "the event store"),
    }
}
