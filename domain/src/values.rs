//! Value types that can only hold valid values. Each `parse` enforces one profile rule of the
//! public contract and names the offending field in its error.
//!
//! Text is normalised here, once, so that everything downstream (the events, the email index,
//! the views) compares and displays the same form; docs/text-policy.md states the policy.

use icu_casemap::CaseMapper;
use icu_properties::props::{GeneralCategory, Script};
use icu_properties::script::ScriptWithExtensions;
use icu_properties::CodePointMapData;
use idna::uts46::{AsciiDenyList, DnsLength, Hyphens, Uts46};
use serde::{Deserialize, Serialize};
use std::fmt;
use unicode_normalization::UnicodeNormalization;

/// Why a value was refused; `field` is the GraphQL argument name clients see.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct ValueError {
    /// The argument or input field that was refused, as clients name it.
    pub field: &'static str,
    /// What is wrong with it, in words a client can show.
    pub reason: String,
}

impl ValueError {
    fn new(field: &'static str, reason: impl Into<String>) -> Self {
        Self {
            field,
            reason: reason.into(),
        }
    }
}

const MAX_EMAIL_LEN: usize = 254;
const MAX_LOCAL_LEN: usize = 64;
const MAX_DISPLAY_NAME: usize = 100;
const MAX_BIO: usize = 2000;
const MAX_AVATAR_URL: usize = 2048;

/// The reason given for a format character, the same in every field.
const FORMAT_CHAR_REASON: &str =
    "must not contain invisible formatting characters (bidi controls, zero-width characters)";

/// Whether `c` is a format character: Unicode general category Cf, looked up in the Unicode
/// Character Database tables compiled into `icu_properties` rather than in a hand-kept list,
/// so that new Cf characters are covered when the data is updated.
///
/// Cf holds the bidi embeddings, overrides and isolates (U+202A–U+202E, U+2066–U+2069), the
/// marks U+200E/U+200F/U+061C, the zero-width space, joiners and word joiner
/// (U+200B–U+200D, U+2060), the invisible operators (U+2061–U+2064), U+FEFF, the soft hyphen
/// U+00AD, U+180E and the tag characters (U+E0001, U+E0020–U+E007F), among others. They draw
/// nothing or reorder what is drawn, so text holding them can look like other text: a name
/// that reads backwards, two addresses that look identical. None of the profile fields
/// accepts them.
pub fn is_format_char(c: char) -> bool {
    CodePointMapData::<GeneralCategory>::new().get(c) == GeneralCategory::Format
}

/// Combining marks (Mn, Mc): needed to write many scripts (Devanagari vowel signs and
/// virama, for instance), so the local part of an address accepts them, but not first.
fn is_combining_mark(c: char) -> bool {
    matches!(
        CodePointMapData::<GeneralCategory>::new().get(c),
        GeneralCategory::NonspacingMark | GeneralCategory::SpacingMark
    )
}

/// A script, or one of the writing systems that UTS #39 §5.1 adds so that Japanese (Han,
/// Hiragana, Katakana), Korean (Han, Hangul) and Han with Bopomofo count as one script each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WritingSystem {
    Script(Script),
    Japanese,
    Korean,
    HanWithBopomofo,
}

/// Whether `text` is written in a single script, in the sense of UTS #39 §5.1 ("resolved
/// script set" not empty): each character's Script_Extensions, augmented as above, are
/// intersected; characters of Common and Inherited script (digits, punctuation, combining
/// marks shared by scripts) go with any script. So `alice`, `алиса`, `用户`, `ユーザー` and
/// `たなか田中` are single-script; `аlice` (Cyrillic а, then Latin) is not.
fn is_single_script(text: &str) -> bool {
    let scripts = ScriptWithExtensions::new();
    // `None` means every script is still possible.
    let mut resolved: Option<Vec<WritingSystem>> = None;
    for c in text.chars() {
        let extensions = scripts.get_script_extensions_val(c);
        if extensions.contains(&Script::Common) || extensions.contains(&Script::Inherited) {
            continue;
        }
        let mut set: Vec<WritingSystem> = Vec::with_capacity(4);
        for script in extensions.iter() {
            set.push(WritingSystem::Script(script));
            let added: &[WritingSystem] = match script {
                Script::Han => &[
                    WritingSystem::Japanese,
                    WritingSystem::Korean,
                    WritingSystem::HanWithBopomofo,
                ],
                Script::Hiragana | Script::Katakana => &[WritingSystem::Japanese],
                Script::Hangul => &[WritingSystem::Korean],
                Script::Bopomofo => &[WritingSystem::HanWithBopomofo],
                _ => &[],
            };
            set.extend_from_slice(added);
        }
        let narrowed = match resolved {
            None => set,
            Some(previous) => previous.into_iter().filter(|w| set.contains(w)).collect(),
        };
        if narrowed.is_empty() {
            return false;
        }
        resolved = Some(narrowed);
    }
    true
}

/// Compatibility caseless form of a local part: NFKC, full Unicode case folding, NFKC again
/// (Unicode §3.13 compatibility caseless matching; the second NFKC puts back into normal form
/// what folding decomposed). Idempotent, so a stored address parses to itself.
fn fold_local_part(local: &str) -> String {
    let nfkc: String = local.nfkc().collect();
    CaseMapper::new().fold_string(&nfkc).nfkc().collect()
}

/// UTS #46 processing of the domain: mapping (case, width and other compatibility forms),
/// validation (IDNA2008 code points, bidi and joiner rules, valid Punycode in `xn--` labels),
/// letters/digits/hyphens only in ASCII (STD3 rules), no hyphen first or last in a label,
/// DNS lengths. Returns the Unicode form (U-labels), which `xn--` input also comes back to.
fn normalise_domain(field: &'static str, domain: &str) -> Result<String, ValueError> {
    let malformed = || ValueError::new(field, "the domain is malformed");
    let uts46 = Uts46::new();
    let ascii = uts46
        .to_ascii(
            domain.as_bytes(),
            AsciiDenyList::STD3,
            Hyphens::CheckFirstLast,
            DnsLength::Verify,
        )
        .map_err(|_| malformed())?;
    if !ascii.contains('.') {
        return Err(ValueError::new(field, "the domain must contain a dot"));
    }
    let (unicode, checked) = uts46.to_unicode(
        ascii.as_bytes(),
        AsciiDenyList::STD3,
        Hyphens::CheckFirstLast,
    );
    checked.map_err(|_| malformed())?;
    // IDNA allows a label to mix scripts; a Latin label with one Cyrillic letter is the
    // classic look-alike of a real domain, so each label must be single-script.
    if !unicode.split('.').all(is_single_script) {
        return Err(ValueError::new(
            field,
            "each part of the domain must be written in a single script",
        ));
    }
    Ok(unicode.into_owned())
}

/// An email address in its normalised form, so that two spellings of one address are one
/// value (and one account): the local part in compatibility caseless form (NFKC, Unicode case
/// folding, NFKC), the domain after UTS #46 (IDNA) processing, stored in its Unicode form
/// (`bücher.example`, never `xn--bcher-kva.example`).
///
/// Mixed-script policy: the local part must be written in a single script (UTS #39 §5.1,
/// with Japanese and Korean counting as one script each); digits and ASCII punctuation go with
/// any script. So `alice`, `алиса` and `用户` are accepted and `аlice` with a Cyrillic `а` is
/// refused. The same holds for each label of the domain, while different labels may differ
/// (`пример.com`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Email(String);

impl Email {
    /// Parses and normalises an address: no invisible formatting characters, spaces or control
    /// characters; exactly one `@` (compatibility forms such as a fullwidth `＠` count); a
    /// local part of 1–64 characters of letters, digits, combining marks (not first) and
    /// `!#$%&'*+-/=?^_`{|}~.` with no leading, trailing or doubled dot, in a single script; a
    /// valid internationalised domain with a dot and single-script labels; at most 254
    /// characters in all once normalised.
    pub fn parse(raw: &str) -> Result<Self, ValueError> {
        let field = "email";
        let raw = raw.trim();
        if raw.is_empty() {
            return Err(ValueError::new(field, "must not be empty"));
        }
        // Checked before normalising: IDNA mapping would silently delete some of them
        // (U+00AD, U+200B), and an address typed with them is not the address it shows.
        if raw.chars().any(is_format_char) {
            return Err(ValueError::new(field, FORMAT_CHAR_REASON));
        }
        // NFKC first so that a fullwidth `＠` or `．` is read as the character it stands for.
        let s: String = raw.nfkc().collect();
        if s.chars().count() > MAX_EMAIL_LEN {
            return Err(ValueError::new(field, "must be at most 254 characters"));
        }
        if s.chars().any(|c| c.is_control() || c.is_whitespace()) {
            return Err(ValueError::new(
                field,
                "must not contain spaces or control characters",
            ));
        }
        let (local, domain) = match s.split_once('@') {
            Some((l, d)) if !d.contains('@') => (l, d),
            _ => return Err(ValueError::new(field, "must contain exactly one '@'")),
        };
        let local = fold_local_part(local);
        if local.is_empty() || local.chars().count() > MAX_LOCAL_LEN {
            return Err(ValueError::new(
                field,
                "the part before '@' must be 1 to 64 characters",
            ));
        }
        if local.starts_with('.') || local.ends_with('.') || local.contains("..") {
            return Err(ValueError::new(field, "the part before '@' is malformed"));
        }
        let local_ok = local.chars().all(|c| {
            c.is_alphanumeric() || is_combining_mark(c) || "!#$%&'*+-/=?^_`{|}~.".contains(c)
        });
        // A mark that begins a dot-separated part would be drawn on the '.' or on nothing
        // (IDNA refuses a label that begins with one for the same reason).
        let mark_first = local
            .split('.')
            .any(|atom| atom.chars().next().is_some_and(is_combining_mark));
        if !local_ok || mark_first {
            return Err(ValueError::new(
                field,
                "the part before '@' has a character that is not allowed",
            ));
        }
        if !is_single_script(&local) {
            return Err(ValueError::new(
                field,
                "the part before '@' must be written in a single script",
            ));
        }
        let domain = normalise_domain(field, domain)?;
        let email = format!("{local}@{domain}");
        if email.chars().count() > MAX_EMAIL_LEN {
            return Err(ValueError::new(field, "must be at most 254 characters"));
        }
        Ok(Self(email))
    }

    /// The normalised address, as stored and compared.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Email {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A display name: 1–100 characters after trimming and NFC normalisation, no control or
/// format (Cf) characters.
///
/// NFC rather than NFKC: NFC only unifies canonically equivalent spellings (`é` precomposed
/// or as `e` + U+0301), which look the same, while NFKC would rewrite what the user chose to
/// show (`²` to `2`, `ﬁ` to `fi`, fullwidth letters to ASCII).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct DisplayName(String);

impl DisplayName {
    /// Trims, refuses control and format characters, normalises to NFC, then bounds the
    /// length (in characters of the normalised form).
    pub fn parse(raw: &str) -> Result<Self, ValueError> {
        let field = "displayName";
        let s = raw.trim();
        if s.chars().any(char::is_control) {
            return Err(ValueError::new(
                field,
                "must not contain control characters",
            ));
        }
        if s.chars().any(is_format_char) {
            return Err(ValueError::new(field, FORMAT_CHAR_REASON));
        }
        let s: String = s.nfc().collect();
        let len = s.chars().count();
        if len == 0 {
            return Err(ValueError::new(field, "must not be empty"));
        }
        if len > MAX_DISPLAY_NAME {
            return Err(ValueError::new(field, "must be at most 100 characters"));
        }
        Ok(Self(s))
    }

    /// The normalised display name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A biography of at most 2000 characters, NFC-normalised (for the reason given on
/// [`DisplayName`]); line breaks and tabs are allowed, other control characters and format
/// (Cf) characters are not.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Bio(String);

impl Bio {
    /// Refuses control characters other than line breaks and tabs and format characters,
    /// normalises to NFC, then bounds the length (in characters of the normalised form).
    pub fn parse(raw: &str) -> Result<Self, ValueError> {
        let field = "bio";
        if raw
            .chars()
            .any(|c| c.is_control() && !matches!(c, '\n' | '\r' | '\t'))
        {
            return Err(ValueError::new(
                field,
                "must not contain control characters other than line breaks and tabs",
            ));
        }
        if raw.chars().any(is_format_char) {
            return Err(ValueError::new(field, FORMAT_CHAR_REASON));
        }
        let s: String = raw.nfc().collect();
        if s.chars().count() > MAX_BIO {
            return Err(ValueError::new(field, "must be at most 2000 characters"));
        }
        Ok(Self(s))
    }

    /// The normalised biography.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// An avatar address: an `https` URL with a host, at most 2048 characters, no spaces, control
/// or format (Cf) characters. Stored as given (trimmed), not normalised: a URL names bytes on
/// a server, and rewriting it could name another resource.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct AvatarUrl(String);

impl AvatarUrl {
    /// Checks the scheme, the host and the characters; see the type.
    pub fn parse(raw: &str) -> Result<Self, ValueError> {
        let field = "avatarUrl";
        let s = raw.trim();
        if s.chars().count() > MAX_AVATAR_URL {
            return Err(ValueError::new(field, "must be at most 2048 characters"));
        }
        if s.chars().any(|c| c.is_control() || c.is_whitespace()) {
            return Err(ValueError::new(
                field,
                "must not contain spaces or control characters",
            ));
        }
        if s.chars().any(is_format_char) {
            return Err(ValueError::new(field, FORMAT_CHAR_REASON));
        }
        let rest = match s.get(..8) {
            Some(scheme) if scheme.eq_ignore_ascii_case("https://") => &s[8..],
            _ => return Err(ValueError::new(field, "must be an https URL")),
        };
        let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
        let host = authority.rsplit('@').next().unwrap_or("");
        let host = host.split(':').next().unwrap_or("");
        if host.is_empty()
            || !host
                .chars()
                .all(|c| c.is_alphanumeric() || c == '-' || c == '.')
        {
            return Err(ValueError::new(field, "must name a host"));
        }
        Ok(Self(s.to_owned()))
    }

    /// The address as given, trimmed.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn email_is_normalised_to_lower_case_and_trimmed() {
        assert_eq!(
            Email::parse("  Ada@Example.COM ").unwrap().as_str(),
            "ada@example.com"
        );
    }

    #[test]
    fn malformed_emails_are_refused_naming_the_field() {
        for bad in [
            "",
            "ada",
            "ada@",
            "@example.com",
            "ada@example",
            "a b@example.com",
            "ada@@example.com",
            "ada@exa mple.com",
            "ada@-example.com",
            "ada@example..com",
            ".ada@example.com",
            "ada\u{0}@example.com",
            "'; DROP TABLE events;--@x.com",
        ] {
            let err = Email::parse(bad).expect_err(bad);
            assert_eq!(err.field, "email", "{bad}");
        }
        let long_local = format!("{}@example.com", "a".repeat(65));
        assert!(Email::parse(&long_local).is_err());
        let long = format!("a@{}.com", "b".repeat(260));
        assert!(Email::parse(&long).is_err());
    }

    #[test]
    fn display_name_is_trimmed_and_bounded() {
        assert_eq!(DisplayName::parse("  Ada  ").unwrap().as_str(), "Ada");
        assert!(DisplayName::parse("   ").is_err());
        assert!(DisplayName::parse(&"x".repeat(100)).is_ok());
        assert!(DisplayName::parse(&"é".repeat(100)).is_ok());
        assert!(DisplayName::parse(&"x".repeat(101)).is_err());
        assert_eq!(
            DisplayName::parse("Ada\u{7}").unwrap_err().field,
            "displayName"
        );
    }

    #[test]
    fn bio_is_bounded_and_allows_line_breaks() {
        assert!(Bio::parse("line one\nline two\ttab").is_ok());
        assert!(Bio::parse(&"x".repeat(2000)).is_ok());
        assert!(Bio::parse(&"x".repeat(2001)).is_err());
        assert_eq!(Bio::parse("bell\u{7}").unwrap_err().field, "bio");
    }

    #[test]
    fn avatar_url_must_be_https_with_a_host() {
        assert!(AvatarUrl::parse("https://cdn.example.com/a.png").is_ok());
        assert!(AvatarUrl::parse("HTTPS://cdn.example.com").is_ok());
        for bad in [
            "http://cdn.example.com/a.png",
            "https://",
            "https:///path",
            "ftp://x.com",
            "javascript:alert(1)",
            "https://exa mple.com",
        ] {
            assert_eq!(
                AvatarUrl::parse(bad).unwrap_err().field,
                "avatarUrl",
                "{bad}"
            );
        }
        let long = format!("https://example.com/{}", "a".repeat(2048));
        assert!(AvatarUrl::parse(&long).is_err());
    }

    #[test]
    fn fullwidth_email_is_the_same_address_as_ascii() {
        let fullwidth = Email::parse("ＡＬＩＣＥ2@example.com").unwrap();
        assert_eq!(fullwidth, Email::parse("alice2@example.com").unwrap());
        assert_eq!(fullwidth.as_str(), "alice2@example.com");
        // Every part may be in compatibility form, the '@' and the dots included.
        assert_eq!(
            Email::parse("ａｌｉｃｅ２＠ｅｘａｍｐｌｅ．ｃｏｍ")
                .unwrap()
                .as_str(),
            "alice2@example.com"
        );
        // Mathematical bold letters are compatibility forms too.
        assert_eq!(
            Email::parse("\u{1D41A}\u{1D425}\u{1D422}\u{1D41C}\u{1D41E}@example.com")
                .unwrap()
                .as_str(),
            "alice@example.com"
        );
    }

    #[test]
    fn email_local_part_is_case_folded_not_only_lower_cased() {
        // Full case folding: what upper-casing cannot tell apart is one address.
        assert_eq!(
            Email::parse("STRASSE@example.com").unwrap(),
            Email::parse("straße@example.com").unwrap()
        );
        // Final sigma folds to sigma, so both spellings are the upper-case address.
        let upper = Email::parse("ΟΔΥΣΣΕΑΣ@example.com").unwrap();
        assert_eq!(upper, Email::parse("οδυσσεα\u{3c2}@example.com").unwrap());
        assert_eq!(upper, Email::parse("οδυσσεα\u{3c3}@example.com").unwrap());
        // Canonically equivalent spellings are one address (precomposed é or e + U+0301).
        assert_eq!(
            Email::parse("jos\u{e9}@example.com").unwrap(),
            Email::parse("jose\u{301}@example.com").unwrap()
        );
    }

    #[test]
    fn email_local_part_in_one_non_latin_script_is_accepted() {
        for ok in [
            "алиса@example.com",
            "алиса2024@example.com",
            "用户@example.com",
            "ユーザー@example.com",
            "たなか田中@example.com",
            "दीप्ति@example.com",
            "δοκιμή@example.com",
            "café@example.com",
        ] {
            assert!(Email::parse(ok).is_ok(), "{ok}: {:?}", Email::parse(ok));
        }
    }

    #[test]
    fn email_local_part_mixing_scripts_is_refused() {
        for bad in [
            // Cyrillic а (U+0430) in a Latin name: looks like alice@example.com.
            "\u{430}lice@example.com",
            // Latin a in a Cyrillic name.
            "\u{430}л\u{438}с a@example.com",
            "p\u{430}ypal@example.com",
            // Greek omicron in a Latin name.
            "g\u{3bf}\u{3bf}gle@example.com",
            // Latin with Han: single script means one script, not two.
            "tanaka田中@example.com",
        ] {
            let err = Email::parse(bad).expect_err(bad);
            assert_eq!(err.field, "email", "{bad}");
        }
        assert!(Email::parse("\u{430}lice@example.com")
            .unwrap_err()
            .reason
            .contains("single script"));
    }

    #[test]
    fn internationalised_domain_is_accepted_and_stored_in_unicode_form() {
        let idn = Email::parse("User@Bücher.Example").unwrap();
        assert_eq!(idn.as_str(), "user@bücher.example");
        // The Punycode (A-label) spelling is the same address.
        assert_eq!(idn, Email::parse("user@xn--bcher-kva.example").unwrap());
        // UTS 46 mapping: fullwidth and upper case in the domain.
        assert_eq!(idn, Email::parse("user@ＢÜＣＨＥＲ.example").unwrap());
        assert_eq!(
            Email::parse("ivan@пример.рф").unwrap().as_str(),
            "ivan@пример.рф"
        );
        // Labels in different scripts are fine; each label is single-script.
        assert!(Email::parse("ivan@пример.com").is_ok());
        // Invalid Punycode and a label that breaks the IDNA rules are refused.
        for bad in [
            "user@xn--zz-.example",
            "user@xn--a.example",
            "user@\u{301}ab.example",
        ] {
            assert_eq!(Email::parse(bad).expect_err(bad).field, "email", "{bad}");
        }
    }

    #[test]
    fn domain_label_mixing_scripts_is_refused() {
        for bad in [
            // "apple" with Cyrillic а and р.
            "user@\u{430}\u{440}\u{440}le.com",
            // "example" with a Cyrillic е.
            "user@\u{435}xample.com",
            // The same, spelled in Punycode.
            "user@xn--xample-2of.com",
            "user@g\u{3bf}\u{3bf}gle.com",
        ] {
            let err = Email::parse(bad).expect_err(bad);
            assert_eq!(err.field, "email", "{bad}");
            assert!(err.reason.contains("single script"), "{bad}: {err}");
        }
    }

    #[test]
    fn bidi_and_zero_width_characters_are_refused_in_every_field() {
        for c in [
            '\u{202E}', '\u{200B}', '\u{200D}', '\u{2066}', '\u{FEFF}', '\u{AD}',
        ] {
            let email = format!("ali{c}ce@example.com");
            assert_eq!(Email::parse(&email).unwrap_err().field, "email", "{c:?}");
            let email = format!("alice@exa{c}mple.com");
            assert_eq!(Email::parse(&email).unwrap_err().field, "email", "{c:?}");
            let name = format!("Ada{c}Lovelace");
            let err = DisplayName::parse(&name).unwrap_err();
            assert_eq!(err.field, "displayName", "{c:?}");
            assert_eq!(err.reason, FORMAT_CHAR_REASON);
            let bio = format!("hello {c}world");
            assert_eq!(Bio::parse(&bio).unwrap_err().field, "bio", "{c:?}");
            let url = format!("https://cdn.example.com/a{c}.png");
            assert_eq!(
                AvatarUrl::parse(&url).unwrap_err().field,
                "avatarUrl",
                "{c:?}"
            );
        }
        // Alone, or as the whole value, too.
        assert!(DisplayName::parse("\u{200B}").is_err());
        assert!(DisplayName::parse("\u{202E}nimda").is_err());
    }

    #[test]
    fn is_format_char_covers_category_cf() {
        for c in [
            '\u{AD}',
            '\u{600}',
            '\u{61C}',
            '\u{6DD}',
            '\u{70F}',
            '\u{180E}',
            '\u{200B}',
            '\u{200C}',
            '\u{200D}',
            '\u{200E}',
            '\u{200F}',
            '\u{202A}',
            '\u{202B}',
            '\u{202C}',
            '\u{202D}',
            '\u{202E}',
            '\u{2060}',
            '\u{2061}',
            '\u{2062}',
            '\u{2063}',
            '\u{2064}',
            '\u{2066}',
            '\u{2067}',
            '\u{2068}',
            '\u{2069}',
            '\u{206A}',
            '\u{206F}',
            '\u{FEFF}',
            '\u{FFF9}',
            '\u{FFFB}',
            '\u{110BD}',
            '\u{1D173}',
            '\u{E0001}',
            '\u{E0020}',
            '\u{E007F}',
        ] {
            assert!(is_format_char(c), "{:04X}", c as u32);
        }
        for c in [
            'a', 'é', ' ', '\n', '\u{7}', '\u{301}', '\u{FE0F}', '🙂', 'ー', '\u{2028}',
        ] {
            assert!(!is_format_char(c), "{:04X}", c as u32);
        }
    }

    #[test]
    fn display_name_and_bio_are_nfc_normalised_not_nfkc() {
        assert_eq!(
            DisplayName::parse("Jose\u{301}").unwrap().as_str(),
            "Jos\u{e9}"
        );
        assert_eq!(
            DisplayName::parse("Jose\u{301}").unwrap(),
            DisplayName::parse("Jos\u{e9}").unwrap()
        );
        // Compatibility forms are what the user chose to show; NFC keeps them.
        assert_eq!(DisplayName::parse("x² ﬁ Ａ").unwrap().as_str(), "x² ﬁ Ａ");
        assert_eq!(Bio::parse("cafe\u{301}\n").unwrap().as_str(), "caf\u{e9}\n");
        // The bound is on the normalised form: 100 decomposed é are 100 characters.
        assert!(DisplayName::parse(&"e\u{301}".repeat(100)).is_ok());
        assert!(Bio::parse(&"e\u{301}".repeat(2000)).is_ok());
    }

    #[test]
    fn emoji_and_variation_selectors_stay_allowed() {
        assert!(DisplayName::parse("Ada ❤\u{FE0F} 🙂").is_ok());
        assert!(Bio::parse("🙂'").is_ok());
    }

    #[test]
    fn local_part_folding_is_idempotent_for_every_code_point() {
        // A stored address must parse to itself (views and filters re-parse stored values).
        for c in (0..=0x10FFFF).filter_map(char::from_u32) {
            let once = fold_local_part(&c.to_string());
            assert_eq!(fold_local_part(&once), once, "U+{:04X}", c as u32);
            assert!(
                is_format_char(c) || !once.chars().any(is_format_char),
                "U+{:04X}",
                c as u32
            );
        }
    }

    #[test]
    fn normalised_emails_parse_to_themselves() {
        for raw in [
            "  Ada@Example.COM ",
            "ＡＬＩＣＥ2@example.com",
            "User@Bücher.Example",
            "user@xn--bcher-kva.example",
            "STRAẞE@example.com",
            "ΟΔΥΣΣΕΑΣ@пример.рф",
            "たなか田中@例え.jp",
        ] {
            let once = Email::parse(raw).unwrap();
            assert_eq!(Email::parse(once.as_str()).unwrap(), once, "{raw}");
        }
    }
}
