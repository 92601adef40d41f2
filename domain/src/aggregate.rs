//! The `User` aggregate: business rules only. `handle` checks them and writes events to the
//! sink; the email directory is the one outside call, made through a port.

use cqrs_es::event_sink::EventSink;
use cqrs_es::Aggregate;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use uuid::Uuid;

use crate::commands::{ProfilePatch, UserCommand};
use crate::errors::UserError;
use crate::events::UserEvent;
use crate::ports::EmailDirectory;
use crate::values::{AvatarUrl, Bio, DisplayName, Email};
use crate::view::UserView;
use crate::AGGREGATE_TYPE;

/// What the aggregate may ask of the outside world.
#[derive(Clone)]
pub struct UserServices {
    pub emails: Arc<dyn EmailDirectory>,
}

/// A user account. Its state is the same document readers see, folded from its events;
/// `version` counts the events applied, so it equals the last event's sequence.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct User {
    state: Option<UserView>,
    version: u64,
}

impl User {
    pub fn version(&self) -> u64 {
        self.version
    }

    /// The user as readers see it, once created.
    pub fn view(&self) -> Option<&UserView> {
        self.state.as_ref()
    }

    /// The live account a command other than `CreateUser` acts on, after the version check.
    fn live(&self, expected_version: Option<u64>) -> Result<&UserView, UserError> {
        let state = self.state.as_ref().ok_or(UserError::NotFound)?;
        if state.deleted {
            return Err(UserError::AccountDeleted);
        }
        match expected_version {
            Some(expected) if expected != self.version => Err(UserError::Conflict {
                expected,
                actual: self.version,
            }),
            _ => Ok(state),
        }
    }

    async fn ensure_email_free(
        services: &UserServices,
        email: &Email,
        me: Option<Uuid>,
    ) -> Result<(), UserError> {
        let owner = services
            .emails
            .owner_of(email)
            .await
            .map_err(|e| UserError::Directory(e.to_string()))?;
        match owner {
            Some(owner) if Some(owner) != me => Err(UserError::EmailTaken),
            _ => Ok(()),
        }
    }
}

fn patched<T>(
    patch: ProfilePatch,
    current: Option<String>,
    parse: impl Fn(&str) -> Result<T, crate::values::ValueError>,
    as_string: impl Fn(T) -> String,
) -> Result<Option<String>, UserError> {
    Ok(match patch {
        ProfilePatch::Keep => current,
        ProfilePatch::Clear => None,
        ProfilePatch::Set(raw) => Some(as_string(parse(&raw)?)),
    })
}

impl Aggregate for User {
    const TYPE: &'static str = AGGREGATE_TYPE;
    type Command = UserCommand;
    type Event = UserEvent;
    type Error = UserError;
    type Services = UserServices;

    // One arm per command, each a few rules: the aggregate's rules in one place.
    async fn handle(
        &mut self,
        command: Self::Command,
        services: &Self::Services,
        sink: &EventSink<Self>,
    ) -> Result<(), Self::Error> {
        match command {
            UserCommand::CreateUser {
                user_id,
                email,
                display_name,
                bio,
                avatar_url,
                at,
            } => {
                match &self.state {
                    Some(state) if state.deleted => return Err(UserError::AccountDeleted),
                    Some(_) => return Err(UserError::AlreadyExists),
                    None => {}
                }
                let email = Email::parse(&email)?;
                let display_name = DisplayName::parse(&display_name)?;
                let bio = bio.as_deref().map(Bio::parse).transpose()?;
                let avatar_url = avatar_url.as_deref().map(AvatarUrl::parse).transpose()?;
                Self::ensure_email_free(services, &email, None).await?;
                let event = UserEvent::UserCreated {
                    user_id,
                    email: email.as_str().to_owned(),
                    display_name: display_name.as_str().to_owned(),
                    bio: bio.map(|b| b.as_str().to_owned()),
                    avatar_url: avatar_url.map(|a| a.as_str().to_owned()),
                    occurred_at: at,
                };
                sink.write(event, self).await;
            }
            UserCommand::UpdateProfile {
                display_name,
                bio,
                avatar_url,
                expected_version,
                at,
            } => {
                let state = self.live(expected_version)?;
                let display_name = match display_name {
                    Some(raw) => DisplayName::parse(&raw)?.as_str().to_owned(),
                    None => state.display_name.clone(),
                };
                let bio = patched(bio, state.bio.clone(), Bio::parse, |b| {
                    b.as_str().to_owned()
                })?;
                let avatar_url = patched(
                    avatar_url,
                    state.avatar_url.clone(),
                    AvatarUrl::parse,
                    |a| a.as_str().to_owned(),
                )?;
                let unchanged = display_name == state.display_name
                    && bio == state.bio
                    && avatar_url == state.avatar_url;
                if !unchanged {
                    let event = UserEvent::ProfileUpdated {
                        display_name,
                        bio,
                        avatar_url,
                        occurred_at: at,
                    };
                    sink.write(event, self).await;
                }
            }
            UserCommand::ChangeEmail {
                email,
                expected_version,
                at,
            } => {
                let state = self.live(expected_version)?;
                let email = Email::parse(&email)?;
                if email.as_str() != state.email {
                    let old_email = state.email.clone();
                    Self::ensure_email_free(services, &email, Some(state.id)).await?;
                    let event = UserEvent::EmailChanged {
                        old_email,
                        new_email: email.as_str().to_owned(),
                        occurred_at: at,
                    };
                    sink.write(event, self).await;
                }
            }
            UserCommand::DeleteAccount {
                expected_version,
                at,
            } => {
                self.live(expected_version)?;
                sink.write(UserEvent::AccountDeleted { occurred_at: at }, self)
                    .await;
            }
        }
        Ok(())
    }

    fn apply(&mut self, event: Self::Event) {
        self.version += 1;
        let id = match (&event, &self.state) {
            (UserEvent::UserCreated { user_id, .. }, _) => *user_id,
            (_, Some(state)) => state.id,
            // An event before creation cannot be written by `handle`; ignore it.
            (_, None) => return,
        };
        self.state = UserView::fold(self.state.take(), id, self.version, &event);
    }
}

#[cfg(test)]
#[path = "aggregate_tests.rs"]
mod tests;
