//! Given / when / then tests of the `User` aggregate.
use super::*;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use cqrs_es::test::TestFramework;
use std::collections::HashMap;

use crate::errors::ErrorCode;
use crate::ports::PortError;

// ---------------------------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------------------------

const ADA: Uuid = Uuid::from_u128(0x0191_0000_0000_7000_8000_0000_0000_00a1);
const BOB: Uuid = Uuid::from_u128(0x0191_0000_0000_7000_8000_0000_0000_00b2);

const ADA_EMAIL: &str = "ada@example.com";
const BOB_EMAIL: &str = "bob@example.com";
const NEW_EMAIL: &str = "ada.lovelace@example.org";
const AVATAR: &str = "https://cdn.example.com/ada.png";

/// A fixed instant, `n` seconds after a fixed epoch, so events compare exactly.
fn t(n: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(1_700_000_000 + n, 0).expect("a valid timestamp")
}

/// An email directory backed by a map of normalised address to owner.
struct FakeDirectory(HashMap<String, Uuid>);

#[async_trait]
impl EmailDirectory for FakeDirectory {
    async fn owner_of(&self, email: &Email) -> Result<Option<Uuid>, PortError> {
        Ok(self.0.get(email.as_str()).copied())
    }
}

/// An email directory that cannot be reached.
struct DownDirectory;

#[async_trait]
impl EmailDirectory for DownDirectory {
    async fn owner_of(&self, _: &Email) -> Result<Option<Uuid>, PortError> {
        Err(PortError::Unavailable("directory offline".into()))
    }
}

/// Services whose directory knows the given (email, owner) pairs.
fn services(owners: &[(&str, Uuid)]) -> UserServices {
    UserServices {
        emails: Arc::new(FakeDirectory(
            owners.iter().map(|(e, o)| ((*e).to_owned(), *o)).collect(),
        )),
    }
}

/// Services whose directory knows no address.
fn empty_directory() -> UserServices {
    services(&[])
}

/// The directory as it stands once Ada exists (and Bob holds his own address).
fn ada_and_bob() -> UserServices {
    services(&[(ADA_EMAIL, ADA), (BOB_EMAIL, BOB)])
}

fn framework(services: UserServices) -> TestFramework<User> {
    TestFramework::<User>::with(services)
}

fn create_cmd(email: &str, display_name: &str) -> UserCommand {
    UserCommand::CreateUser {
        user_id: ADA,
        email: email.to_owned(),
        display_name: display_name.to_owned(),
        bio: None,
        avatar_url: None,
        at: t(0),
    }
}

fn create_with(bio: Option<&str>, avatar_url: Option<&str>) -> UserCommand {
    UserCommand::CreateUser {
        user_id: ADA,
        email: ADA_EMAIL.to_owned(),
        display_name: "Ada".to_owned(),
        bio: bio.map(str::to_owned),
        avatar_url: avatar_url.map(str::to_owned),
        at: t(0),
    }
}

fn created() -> UserEvent {
    UserEvent::UserCreated {
        user_id: ADA,
        email: ADA_EMAIL.to_owned(),
        display_name: "Ada".to_owned(),
        bio: Some("Analyst".to_owned()),
        avatar_url: Some(AVATAR.to_owned()),
        occurred_at: t(0),
    }
}

fn profile_updated(display_name: &str, bio: Option<&str>, avatar_url: Option<&str>) -> UserEvent {
    UserEvent::ProfileUpdated {
        display_name: display_name.to_owned(),
        bio: bio.map(str::to_owned),
        avatar_url: avatar_url.map(str::to_owned),
        occurred_at: t(10),
    }
}

fn email_changed(old: &str, new: &str) -> UserEvent {
    UserEvent::EmailChanged {
        old_email: old.to_owned(),
        new_email: new.to_owned(),
        occurred_at: t(10),
    }
}

fn deleted() -> UserEvent {
    UserEvent::AccountDeleted { occurred_at: t(20) }
}

fn update(
    display_name: Option<&str>,
    bio: ProfilePatch,
    avatar_url: ProfilePatch,
    expected_version: Option<u64>,
) -> UserCommand {
    UserCommand::UpdateProfile {
        display_name: display_name.map(str::to_owned),
        bio,
        avatar_url,
        expected_version,
        at: t(10),
    }
}

fn rename(display_name: &str) -> UserCommand {
    update(
        Some(display_name),
        ProfilePatch::Keep,
        ProfilePatch::Keep,
        None,
    )
}

fn set_bio(bio: &str) -> UserCommand {
    update(
        None,
        ProfilePatch::Set(bio.to_owned()),
        ProfilePatch::Keep,
        None,
    )
}

fn set_avatar(avatar_url: &str) -> UserCommand {
    update(
        None,
        ProfilePatch::Keep,
        ProfilePatch::Set(avatar_url.to_owned()),
        None,
    )
}

fn change_email(email: &str, expected_version: Option<u64>) -> UserCommand {
    UserCommand::ChangeEmail {
        email: email.to_owned(),
        expected_version,
        at: t(10),
    }
}

fn delete(expected_version: Option<u64>) -> UserCommand {
    UserCommand::DeleteAccount {
        expected_version,
        at: t(20),
    }
}

/// Asserts the command was refused as invalid input naming `field`, with no event written.
fn assert_invalid(result: Result<Vec<UserEvent>, UserError>, field: &str) {
    match result {
        Err(UserError::Validation(err)) => {
            assert_eq!(err.field, field, "wrong field in {err}");
            assert_eq!(
                UserError::Validation(err).code(),
                ErrorCode::ValidationFailed
            );
        }
        other => panic!("expected a validation error on {field}, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// createUser
// ---------------------------------------------------------------------------------------------

#[test]
fn create_user_with_valid_input_emits_user_created() {
    framework(empty_directory())
        .given_no_previous_events()
        .when(UserCommand::CreateUser {
            user_id: ADA,
            email: ADA_EMAIL.to_owned(),
            display_name: "Ada".to_owned(),
            bio: Some("Analyst".to_owned()),
            avatar_url: Some(AVATAR.to_owned()),
            at: t(0),
        })
        .then_expect_events(vec![created()]);
}

#[test]
fn create_user_without_bio_or_avatar_emits_them_as_absent() {
    framework(empty_directory())
        .given_no_previous_events()
        .when(create_cmd(ADA_EMAIL, "Ada"))
        .then_expect_events(vec![UserEvent::UserCreated {
            user_id: ADA,
            email: ADA_EMAIL.to_owned(),
            display_name: "Ada".to_owned(),
            bio: None,
            avatar_url: None,
            occurred_at: t(0),
        }]);
}

#[test]
fn create_user_stores_email_trimmed_and_lower_cased() {
    let events = framework(empty_directory())
        .given_no_previous_events()
        .when(create_cmd("  Ada@Example.COM ", "Ada"))
        .inspect_result()
        .expect("accepted");
    match events.as_slice() {
        [UserEvent::UserCreated { email, .. }] => assert_eq!(email, ADA_EMAIL),
        other => panic!("expected one UserCreated, got {other:?}"),
    }
}

#[test]
fn create_user_stores_display_name_trimmed() {
    let events = framework(empty_directory())
        .given_no_previous_events()
        .when(create_cmd(ADA_EMAIL, "   Ada Lovelace \t"))
        .inspect_result()
        .expect("accepted");
    match events.as_slice() {
        [UserEvent::UserCreated { display_name, .. }] => assert_eq!(display_name, "Ada Lovelace"),
        other => panic!("expected one UserCreated, got {other:?}"),
    }
}

#[test]
fn create_user_accepts_boundary_lengths() {
    let name = "é".repeat(100);
    let bio = "x".repeat(2000);
    let avatar = format!("https://example.com/{}", "a".repeat(2048 - 20));
    assert_eq!(avatar.chars().count(), 2048);
    let events = framework(empty_directory())
        .given_no_previous_events()
        .when(UserCommand::CreateUser {
            user_id: ADA,
            email: ADA_EMAIL.to_owned(),
            display_name: name.clone(),
            bio: Some(bio.clone()),
            avatar_url: Some(avatar.clone()),
            at: t(0),
        })
        .inspect_result()
        .expect("accepted");
    assert_eq!(
        events,
        vec![UserEvent::UserCreated {
            user_id: ADA,
            email: ADA_EMAIL.to_owned(),
            display_name: name,
            bio: Some(bio),
            avatar_url: Some(avatar),
            occurred_at: t(0),
        }]
    );
}

#[test]
fn create_user_allows_line_breaks_and_tabs_in_bio() {
    framework(empty_directory())
        .given_no_previous_events()
        .when(create_with(Some("line one\nline two\r\n\tindented"), None))
        .then_expect_events(vec![UserEvent::UserCreated {
            user_id: ADA,
            email: ADA_EMAIL.to_owned(),
            display_name: "Ada".to_owned(),
            bio: Some("line one\nline two\r\n\tindented".to_owned()),
            avatar_url: None,
            occurred_at: t(0),
        }]);
}

#[test]
fn create_user_rejects_invalid_email() {
    for bad in [
        "",
        "   ",
        "ada",
        "ada@",
        "@example.com",
        "ada@example",
        "a b@example.com",
        "ada@@example.com",
        "ada\u{7}@example.com",
    ] {
        let result = framework(empty_directory())
            .given_no_previous_events()
            .when(create_cmd(bad, "Ada"))
            .inspect_result();
        assert_invalid(result, "email");
    }
}

#[test]
fn create_user_rejects_empty_display_name() {
    for bad in ["", "    ", "\t\n"] {
        let result = framework(empty_directory())
            .given_no_previous_events()
            .when(create_cmd(ADA_EMAIL, bad))
            .inspect_result();
        assert_invalid(result, "displayName");
    }
}

#[test]
fn create_user_rejects_display_name_longer_than_100_characters() {
    let result = framework(empty_directory())
        .given_no_previous_events()
        .when(create_cmd(ADA_EMAIL, &"x".repeat(101)))
        .inspect_result();
    assert_invalid(result, "displayName");
}

#[test]
fn create_user_rejects_display_name_with_control_characters() {
    for bad in ["Ada\u{7}", "Ada\nLovelace", "\u{0}Ada", "Ada\u{9b}x"] {
        let result = framework(empty_directory())
            .given_no_previous_events()
            .when(create_cmd(ADA_EMAIL, bad))
            .inspect_result();
        assert_invalid(result, "displayName");
    }
}

#[test]
fn create_user_rejects_bio_longer_than_2000_characters() {
    let result = framework(empty_directory())
        .given_no_previous_events()
        .when(create_with(Some(&"x".repeat(2001)), None))
        .inspect_result();
    assert_invalid(result, "bio");
}

#[test]
fn create_user_rejects_bio_with_control_characters() {
    let result = framework(empty_directory())
        .given_no_previous_events()
        .when(create_with(Some("ring the bell\u{7}"), None))
        .inspect_result();
    assert_invalid(result, "bio");
}

#[test]
fn create_user_rejects_avatar_url_that_is_not_https() {
    for bad in [
        "http://cdn.example.com/ada.png",
        "ftp://cdn.example.com/ada.png",
        "javascript:alert(1)",
        "cdn.example.com/ada.png",
        "https://",
    ] {
        let result = framework(empty_directory())
            .given_no_previous_events()
            .when(create_with(None, Some(bad)))
            .inspect_result();
        assert_invalid(result, "avatarUrl");
    }
}

#[test]
fn create_user_rejects_avatar_url_longer_than_2048_characters() {
    let too_long = format!("https://example.com/{}", "a".repeat(2048 - 20 + 1));
    assert_eq!(too_long.chars().count(), 2049);
    let result = framework(empty_directory())
        .given_no_previous_events()
        .when(create_with(None, Some(&too_long)))
        .inspect_result();
    assert_invalid(result, "avatarUrl");
}

#[test]
fn create_user_rejects_email_taken_by_another_account() {
    framework(services(&[(ADA_EMAIL, BOB)]))
        .given_no_previous_events()
        .when(create_cmd(ADA_EMAIL, "Ada"))
        .then_expect_error(UserError::EmailTaken);
}

#[test]
fn create_user_detects_taken_email_case_insensitively() {
    framework(services(&[(ADA_EMAIL, BOB)]))
        .given_no_previous_events()
        .when(create_cmd("ADA@Example.com", "Ada"))
        .then_expect_error(UserError::EmailTaken);
}

#[test]
fn create_user_email_taken_maps_to_email_taken_code() {
    assert_eq!(UserError::EmailTaken.code(), ErrorCode::EmailTaken);
}

#[test]
fn create_user_rejects_a_user_that_already_exists() {
    framework(empty_directory())
        .given(vec![created()])
        .when(create_cmd(BOB_EMAIL, "Another Ada"))
        .then_expect_error(UserError::AlreadyExists);
}

#[test]
fn create_user_reports_unreachable_directory_as_unavailable() {
    let result = framework(UserServices {
        emails: Arc::new(DownDirectory),
    })
    .given_no_previous_events()
    .when(create_cmd(ADA_EMAIL, "Ada"))
    .inspect_result();
    match result {
        Err(err @ UserError::Directory(_)) => assert_eq!(err.code(), ErrorCode::Unavailable),
        other => panic!("expected a directory error, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// updateProfile
// ---------------------------------------------------------------------------------------------

#[test]
fn update_profile_changes_display_name_keeping_other_fields() {
    framework(ada_and_bob())
        .given(vec![created()])
        .when(rename("Countess Lovelace"))
        .then_expect_events(vec![profile_updated(
            "Countess Lovelace",
            Some("Analyst"),
            Some(AVATAR),
        )]);
}

#[test]
fn update_profile_trims_display_name() {
    framework(ada_and_bob())
        .given(vec![created()])
        .when(rename("  Countess  "))
        .then_expect_events(vec![profile_updated(
            "Countess",
            Some("Analyst"),
            Some(AVATAR),
        )]);
}

#[test]
fn update_profile_changes_bio_keeping_other_fields() {
    framework(ada_and_bob())
        .given(vec![created()])
        .when(set_bio("Mathematician"))
        .then_expect_events(vec![profile_updated(
            "Ada",
            Some("Mathematician"),
            Some(AVATAR),
        )]);
}

#[test]
fn update_profile_changes_avatar_url_keeping_other_fields() {
    framework(ada_and_bob())
        .given(vec![created()])
        .when(set_avatar("https://cdn.example.com/ada-2.png"))
        .then_expect_events(vec![profile_updated(
            "Ada",
            Some("Analyst"),
            Some("https://cdn.example.com/ada-2.png"),
        )]);
}

#[test]
fn update_profile_changes_every_field_at_once() {
    framework(ada_and_bob())
        .given(vec![created()])
        .when(update(
            Some("Countess"),
            ProfilePatch::Set("Mathematician".into()),
            ProfilePatch::Set("https://img.example.net/c.png".into()),
            None,
        ))
        .then_expect_events(vec![profile_updated(
            "Countess",
            Some("Mathematician"),
            Some("https://img.example.net/c.png"),
        )]);
}

#[test]
fn update_profile_sets_bio_and_avatar_on_a_user_created_without_them() {
    framework(ada_and_bob())
        .given(vec![UserEvent::UserCreated {
            user_id: ADA,
            email: ADA_EMAIL.to_owned(),
            display_name: "Ada".to_owned(),
            bio: None,
            avatar_url: None,
            occurred_at: t(0),
        }])
        .when(update(
            None,
            ProfilePatch::Set("Analyst".into()),
            ProfilePatch::Set(AVATAR.into()),
            None,
        ))
        .then_expect_events(vec![profile_updated("Ada", Some("Analyst"), Some(AVATAR))]);
}

#[test]
fn update_profile_clears_bio_with_clear_patch() {
    framework(ada_and_bob())
        .given(vec![created()])
        .when(update(None, ProfilePatch::Clear, ProfilePatch::Keep, None))
        .then_expect_events(vec![profile_updated("Ada", None, Some(AVATAR))]);
}

#[test]
fn update_profile_clears_avatar_url_with_clear_patch() {
    framework(ada_and_bob())
        .given(vec![created()])
        .when(update(None, ProfilePatch::Keep, ProfilePatch::Clear, None))
        .then_expect_events(vec![profile_updated("Ada", Some("Analyst"), None)]);
}

#[test]
fn update_profile_applies_to_latest_state_after_earlier_updates() {
    framework(ada_and_bob())
        .given(vec![
            created(),
            profile_updated("Countess", None, Some(AVATAR)),
        ])
        .when(set_bio("Back again"))
        .then_expect_events(vec![profile_updated(
            "Countess",
            Some("Back again"),
            Some(AVATAR),
        )]);
}

#[test]
fn update_profile_with_nothing_to_change_emits_nothing() {
    framework(ada_and_bob())
        .given(vec![created()])
        .when(update(None, ProfilePatch::Keep, ProfilePatch::Keep, None))
        .then_expect_events(vec![]);
}

#[test]
fn update_profile_setting_the_current_values_emits_nothing() {
    framework(ada_and_bob())
        .given(vec![created()])
        .when(update(
            Some("  Ada "),
            ProfilePatch::Set("Analyst".into()),
            ProfilePatch::Set(AVATAR.into()),
            None,
        ))
        .then_expect_events(vec![]);
}

#[test]
fn update_profile_clearing_already_absent_fields_emits_nothing() {
    framework(ada_and_bob())
        .given(vec![created(), profile_updated("Ada", None, None)])
        .when(update(None, ProfilePatch::Clear, ProfilePatch::Clear, None))
        .then_expect_events(vec![]);
}

#[test]
fn update_profile_rejects_empty_display_name() {
    let result = framework(ada_and_bob())
        .given(vec![created()])
        .when(rename("   "))
        .inspect_result();
    assert_invalid(result, "displayName");
}

#[test]
fn update_profile_rejects_display_name_longer_than_100_characters() {
    let result = framework(ada_and_bob())
        .given(vec![created()])
        .when(rename(&"x".repeat(101)))
        .inspect_result();
    assert_invalid(result, "displayName");
}

#[test]
fn update_profile_rejects_display_name_with_control_characters() {
    let result = framework(ada_and_bob())
        .given(vec![created()])
        .when(rename("Ada\u{1b}[31m"))
        .inspect_result();
    assert_invalid(result, "displayName");
}

#[test]
fn update_profile_rejects_bio_longer_than_2000_characters() {
    let result = framework(ada_and_bob())
        .given(vec![created()])
        .when(set_bio(&"x".repeat(2001)))
        .inspect_result();
    assert_invalid(result, "bio");
}

#[test]
fn update_profile_rejects_bio_with_control_characters() {
    let result = framework(ada_and_bob())
        .given(vec![created()])
        .when(set_bio("nul\u{0}byte"))
        .inspect_result();
    assert_invalid(result, "bio");
}

#[test]
fn update_profile_rejects_avatar_url_that_is_not_https() {
    let result = framework(ada_and_bob())
        .given(vec![created()])
        .when(set_avatar("http://cdn.example.com/ada.png"))
        .inspect_result();
    assert_invalid(result, "avatarUrl");
}

#[test]
fn update_profile_rejects_avatar_url_longer_than_2048_characters() {
    let result = framework(ada_and_bob())
        .given(vec![created()])
        .when(set_avatar(&format!(
            "https://example.com/{}",
            "a".repeat(2048)
        )))
        .inspect_result();
    assert_invalid(result, "avatarUrl");
}

#[test]
fn update_profile_rejects_the_whole_update_when_one_field_is_invalid() {
    let result = framework(ada_and_bob())
        .given(vec![created()])
        .when(update(
            Some("Countess"),
            ProfilePatch::Set("Mathematician".into()),
            ProfilePatch::Set("http://insecure.example.com/a.png".into()),
            None,
        ))
        .inspect_result();
    assert_invalid(result, "avatarUrl");
}

#[test]
fn update_profile_with_stale_expected_version_is_a_conflict() {
    framework(ada_and_bob())
        .given(vec![created(), profile_updated("Countess", None, None)])
        .when(update(
            Some("Ada"),
            ProfilePatch::Keep,
            ProfilePatch::Keep,
            Some(1),
        ))
        .then_expect_error(UserError::Conflict {
            expected: 1,
            actual: 2,
        });
}

#[test]
fn update_profile_with_future_expected_version_is_a_conflict() {
    framework(ada_and_bob())
        .given(vec![created()])
        .when(update(
            Some("Countess"),
            ProfilePatch::Keep,
            ProfilePatch::Keep,
            Some(5),
        ))
        .then_expect_error(UserError::Conflict {
            expected: 5,
            actual: 1,
        });
}

#[test]
fn update_profile_conflict_is_reported_even_when_nothing_would_change() {
    framework(ada_and_bob())
        .given(vec![created()])
        .when(update(
            None,
            ProfilePatch::Keep,
            ProfilePatch::Keep,
            Some(0),
        ))
        .then_expect_error(UserError::Conflict {
            expected: 0,
            actual: 1,
        });
}

#[test]
fn update_profile_conflict_maps_to_conflict_code() {
    assert_eq!(
        UserError::Conflict {
            expected: 1,
            actual: 2
        }
        .code(),
        ErrorCode::Conflict
    );
}

#[test]
fn update_profile_with_matching_expected_version_is_accepted() {
    framework(ada_and_bob())
        .given(vec![created(), profile_updated("Countess", None, None)])
        .when(update(
            Some("Ada"),
            ProfilePatch::Keep,
            ProfilePatch::Keep,
            Some(2),
        ))
        .then_expect_events(vec![profile_updated("Ada", None, None)]);
}

#[test]
fn update_profile_of_unknown_user_is_not_found() {
    framework(ada_and_bob())
        .given_no_previous_events()
        .when(rename("Ada"))
        .then_expect_error(UserError::NotFound);
}

// ---------------------------------------------------------------------------------------------
// changeEmail
// ---------------------------------------------------------------------------------------------

#[test]
fn change_email_to_a_free_address_emits_email_changed() {
    framework(ada_and_bob())
        .given(vec![created()])
        .when(change_email(NEW_EMAIL, None))
        .then_expect_events(vec![email_changed(ADA_EMAIL, NEW_EMAIL)]);
}

#[test]
fn change_email_stores_new_address_normalised() {
    framework(ada_and_bob())
        .given(vec![created()])
        .when(change_email("  Ada.Lovelace@EXAMPLE.org ", None))
        .then_expect_events(vec![email_changed(ADA_EMAIL, NEW_EMAIL)]);
}

#[test]
fn change_email_records_the_current_address_as_old_after_earlier_changes() {
    framework(ada_and_bob())
        .given(vec![created(), email_changed(ADA_EMAIL, NEW_EMAIL)])
        .when(change_email("ada@example.net", None))
        .then_expect_events(vec![email_changed(NEW_EMAIL, "ada@example.net")]);
}

#[test]
fn change_email_to_the_same_address_emits_nothing() {
    framework(ada_and_bob())
        .given(vec![created()])
        .when(change_email(ADA_EMAIL, None))
        .then_expect_events(vec![]);
}

#[test]
fn change_email_to_the_same_address_in_other_case_emits_nothing() {
    framework(ada_and_bob())
        .given(vec![created()])
        .when(change_email(" ADA@Example.Com ", None))
        .then_expect_events(vec![]);
}

#[test]
fn change_email_to_an_address_taken_by_another_account_is_refused() {
    framework(ada_and_bob())
        .given(vec![created()])
        .when(change_email(BOB_EMAIL, None))
        .then_expect_error(UserError::EmailTaken);
}

#[test]
fn change_email_detects_taken_address_case_insensitively() {
    framework(ada_and_bob())
        .given(vec![created()])
        .when(change_email("Bob@EXAMPLE.com", None))
        .then_expect_error(UserError::EmailTaken);
}

#[test]
fn change_email_to_an_address_the_directory_says_i_own_is_not_taken() {
    // The directory may already list the new address under this user (e.g. a retried
    // command); the user's own address is never "taken".
    framework(services(&[(ADA_EMAIL, ADA), (NEW_EMAIL, ADA)]))
        .given(vec![created()])
        .when(change_email(NEW_EMAIL, None))
        .then_expect_events(vec![email_changed(ADA_EMAIL, NEW_EMAIL)]);
}

#[test]
fn change_email_rejects_invalid_address() {
    for bad in [
        "",
        "not-an-email",
        "ada@",
        "ada@example",
        "a da@example.com",
    ] {
        let result = framework(ada_and_bob())
            .given(vec![created()])
            .when(change_email(bad, None))
            .inspect_result();
        assert_invalid(result, "email");
    }
}

#[test]
fn change_email_with_stale_expected_version_is_a_conflict() {
    framework(ada_and_bob())
        .given(vec![created(), profile_updated("Countess", None, None)])
        .when(change_email(NEW_EMAIL, Some(1)))
        .then_expect_error(UserError::Conflict {
            expected: 1,
            actual: 2,
        });
}

#[test]
fn change_email_with_matching_expected_version_is_accepted() {
    framework(ada_and_bob())
        .given(vec![created(), profile_updated("Countess", None, None)])
        .when(change_email(NEW_EMAIL, Some(2)))
        .then_expect_events(vec![email_changed(ADA_EMAIL, NEW_EMAIL)]);
}

#[test]
fn change_email_of_unknown_user_is_not_found() {
    framework(ada_and_bob())
        .given_no_previous_events()
        .when(change_email(NEW_EMAIL, None))
        .then_expect_error(UserError::NotFound);
}

#[test]
fn change_email_reports_unreachable_directory_as_unavailable() {
    let result = framework(UserServices {
        emails: Arc::new(DownDirectory),
    })
    .given(vec![created()])
    .when(change_email(NEW_EMAIL, None))
    .inspect_result();
    match result {
        Err(err @ UserError::Directory(_)) => assert_eq!(err.code(), ErrorCode::Unavailable),
        other => panic!("expected a directory error, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// deleteAccount
// ---------------------------------------------------------------------------------------------

#[test]
fn delete_account_emits_account_deleted() {
    framework(ada_and_bob())
        .given(vec![created()])
        .when(delete(None))
        .then_expect_events(vec![deleted()]);
}

#[test]
fn delete_account_with_matching_expected_version_is_accepted() {
    framework(ada_and_bob())
        .given(vec![created(), email_changed(ADA_EMAIL, NEW_EMAIL)])
        .when(delete(Some(2)))
        .then_expect_events(vec![deleted()]);
}

#[test]
fn delete_account_with_stale_expected_version_is_a_conflict() {
    framework(ada_and_bob())
        .given(vec![created(), email_changed(ADA_EMAIL, NEW_EMAIL)])
        .when(delete(Some(1)))
        .then_expect_error(UserError::Conflict {
            expected: 1,
            actual: 2,
        });
}

#[test]
fn delete_account_of_unknown_user_is_not_found() {
    framework(ada_and_bob())
        .given_no_previous_events()
        .when(delete(None))
        .then_expect_error(UserError::NotFound);
}

#[test]
fn not_found_maps_to_not_found_code() {
    assert_eq!(UserError::NotFound.code(), ErrorCode::NotFound);
}

#[test]
fn deleted_account_refuses_a_second_delete() {
    framework(ada_and_bob())
        .given(vec![created(), deleted()])
        .when(delete(None))
        .then_expect_error(UserError::AccountDeleted);
}

#[test]
fn deleted_account_refuses_profile_updates() {
    framework(ada_and_bob())
        .given(vec![created(), deleted()])
        .when(rename("Ghost"))
        .then_expect_error(UserError::AccountDeleted);
}

#[test]
fn deleted_account_refuses_no_op_profile_updates() {
    framework(ada_and_bob())
        .given(vec![created(), deleted()])
        .when(update(None, ProfilePatch::Keep, ProfilePatch::Keep, None))
        .then_expect_error(UserError::AccountDeleted);
}

#[test]
fn deleted_account_refuses_email_changes() {
    framework(empty_directory())
        .given(vec![created(), deleted()])
        .when(change_email(NEW_EMAIL, None))
        .then_expect_error(UserError::AccountDeleted);
}

#[test]
fn deleted_account_refuses_email_change_to_its_former_address() {
    framework(empty_directory())
        .given(vec![created(), deleted()])
        .when(change_email(ADA_EMAIL, None))
        .then_expect_error(UserError::AccountDeleted);
}

#[test]
fn deleted_account_refuses_commands_even_with_matching_expected_version() {
    for command in [
        rename("Ghost"),
        change_email(NEW_EMAIL, Some(2)),
        delete(Some(2)),
        update(
            None,
            ProfilePatch::Set("boo".into()),
            ProfilePatch::Keep,
            Some(2),
        ),
    ] {
        framework(empty_directory())
            .given(vec![created(), deleted()])
            .when(command)
            .then_expect_error(UserError::AccountDeleted);
    }
}

#[test]
fn deleted_account_reports_deleted_before_stale_version_or_invalid_input() {
    for command in [
        delete(Some(0)),
        change_email("not-an-email", Some(7)),
        rename(""),
    ] {
        framework(empty_directory())
            .given(vec![created(), deleted()])
            .when(command)
            .then_expect_error(UserError::AccountDeleted);
    }
}

#[test]
fn deleted_account_refuses_being_created_again() {
    // A deleted account accepts no further commands: it is not revived by `createUser`.
    framework(empty_directory())
        .given(vec![created(), deleted()])
        .when(create_cmd(ADA_EMAIL, "Ada"))
        .then_expect_error(UserError::AccountDeleted);
}

#[test]
fn account_deleted_maps_to_account_deleted_code() {
    assert_eq!(UserError::AccountDeleted.code(), ErrorCode::AccountDeleted);
}

// ---------------------------------------------------------------------------------------------
// State: version and view
// ---------------------------------------------------------------------------------------------

#[test]
fn new_user_has_version_zero_and_no_view() {
    let user = User::default();
    assert_eq!(user.version(), 0);
    assert!(user.view().is_none());
}

#[test]
fn version_and_view_reflect_applied_events_in_sequence() {
    let mut user = User::default();

    user.apply(created());
    assert_eq!(user.version(), 1);
    let view = user.view().expect("created");
    assert_eq!(
        *view,
        UserView {
            id: ADA,
            email: ADA_EMAIL.to_owned(),
            display_name: "Ada".to_owned(),
            bio: Some("Analyst".to_owned()),
            avatar_url: Some(AVATAR.to_owned()),
            created_at: t(0),
            updated_at: t(0),
            version: 1,
            deleted: false,
        }
    );

    user.apply(profile_updated("Countess", None, Some(AVATAR)));
    assert_eq!(user.version(), 2);
    let view = user.view().expect("still there");
    assert_eq!(view.version, 2);
    assert_eq!(view.display_name, "Countess");
    assert_eq!(view.bio, None);
    assert_eq!(view.avatar_url.as_deref(), Some(AVATAR));
    assert_eq!(view.created_at, t(0));
    assert_eq!(view.updated_at, t(10));

    user.apply(UserEvent::EmailChanged {
        old_email: ADA_EMAIL.to_owned(),
        new_email: NEW_EMAIL.to_owned(),
        occurred_at: t(15),
    });
    assert_eq!(user.version(), 3);
    let view = user.view().expect("still there");
    assert_eq!(view.version, 3);
    assert_eq!(view.email, NEW_EMAIL);
    assert_eq!(view.display_name, "Countess");
    assert_eq!(view.created_at, t(0));
    assert_eq!(view.updated_at, t(15));
    assert!(!view.deleted);
}

#[test]
fn deleted_user_view_is_a_tombstone_without_personal_data() {
    let mut user = User::default();
    for event in [
        created(),
        email_changed(ADA_EMAIL, NEW_EMAIL),
        profile_updated("Countess", Some("Analyst"), Some(AVATAR)),
        deleted(),
    ] {
        user.apply(event);
    }
    assert_eq!(user.version(), 4);
    assert_eq!(
        *user.view().expect("tombstone kept"),
        UserView {
            id: ADA,
            email: String::new(),
            display_name: String::new(),
            bio: None,
            avatar_url: None,
            created_at: t(0),
            updated_at: t(20),
            version: 4,
            deleted: true,
        }
    );
}

#[test]
fn handling_a_command_applies_its_events_to_the_aggregate() {
    // Drive the aggregate as the framework does, then check the state the sink left behind.
    let user = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime")
        .block_on(async {
            let services = empty_directory();
            let mut user = User::default();
            let sink = cqrs_es::event_sink::EventSink::<User>::default();
            user.handle(create_cmd(ADA_EMAIL, "Ada"), &services, &sink)
                .await
                .expect("created");
            user.handle(rename("Countess"), &services, &sink)
                .await
                .expect("renamed");
            user.handle(change_email(NEW_EMAIL, Some(2)), &services, &sink)
                .await
                .expect("email changed");
            assert_eq!(sink.collect().await.len(), 3);
            user
        });
    assert_eq!(user.version(), 3);
    let view = user.view().expect("created");
    assert_eq!(view.version, 3);
    assert_eq!(view.display_name, "Countess");
    assert_eq!(view.email, NEW_EMAIL);
    assert_eq!(view.updated_at, t(10));
}
