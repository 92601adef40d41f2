//! Bearer tokens: expired, not yet valid, wrongly signed, `alg: none` and malformed tokens
//! are refused with 401 `UNAUTHENTICATED` (never treated as anonymous); RS256 and ES256
//! tokens verify against `PCF_JWT_PUBLIC_KEY`, and with a public key configured an HS256
//! token is refused (no algorithm confusion).

use crate::support::*;
use axum::http::StatusCode;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use std::time::Duration;

// Test keys only, generated with `openssl genpkey` for these tests; they protect nothing.

const RSA_PRIVATE: &str = "-----BEGIN PRIVATE KEY-----
MIIEvgIBADANBgkqhkiG9w0BAQEFAASCBKgwggSkAgEAAoIBAQCHMiNl6cmGCWoL
Wwsn/VdZV1pr5gxUmHWC4U8Q/OLtfviABFbK0TopJOgBLpsNNul02Kp5Zp577w4H
UhrpEYxbbTuoBdS0Uf6iWHoQeF8/jo3eEHS+TtD+LbZ92WbOEOPlEzj/c1Auuk1v
47ahsOUaxdMUSLnl10P/tjj20zfBELn6qCefkaPUi1qPPEA1MSsDRpC2FcSaGHkP
ed9qNFac+DTRypXluUJDwLBnthiU589K8wV0JRivyCYzAYTbyqkYzFYa20DGwB9d
Z0tnZYYbS8L3YtQ9iraC7YqeIbKSuPtvW5vZt1yEgMrxf0pFJm+W30ZRshaSmuWk
VQeKQVKTAgMBAAECggEAFUznedeXOiiCji52eAL4v6k9JFHW8H8iyI+iCu2k/UEr
etP0Lrk/PhtD+Ge04ySbLJ80YLMz1hfocGvVtJHguMjhhMwCYrSmd0KUXMLyUsut
e2bBVfiKAfoGzhYyFdZgaYeZS9oJsIsGx1GrxRbfSdQQORpqO5Wqb3/wwqatmpvC
51PhS2bs/IZVQWfbR95+a8dUEK6purC8wD/o7AHQudHt0zckxtjIXpjWYp2EroIB
I0e4VeJl6hmMAlQPdD412oInGWxtN3oMpaB4QuJeghMh/XuwwxCshIMRu/74NIGV
3U6Hk0oEOwDc6yGbBsWwNeV4c65a/g+JUOdvcNibCQKBgQC9uF6nodtP9HK285kr
tq5v1hCFfEoMYOpgEITcdpljG0aUlEc+ANYh68XEQwVovLw6iXOPBRRIUaD3uQhe
crhzVJA6Zrv9g9V5Yll6xTM+/OBTHw29FFYWJb9ASJcBA+duvlYRuArkSM5VF1jp
GQTqfmqUDlKv2UCkTjkMmLqPqwKBgQC2bWH3tZvWzvGoVmZbfuaKYJN0jvqUn8+8
qssVE8sIC1QKjI3LNN4v6qmp8nydP8Avx4ODb2gwfYE27xf18eyiRIN4367JLuCU
T7G/vaOVnWS6kXg0Iztnvp136hinO3HmxGAMnxyO6xSUntHYDsumWmztcLYfcj7c
raWo2M6AuQKBgQCmOb0NaP4r7sT30TV6HIR3znoJSt3iPKP96VtPgsZgFEzh740A
IWF8tQRBMmux2fOd4kKSo+OifYrooYFYp3E+82+vC8ZYmELZKLe3nsKIxK2ThpjV
+tR2cTpBi5hqtk33NONagQNiAvxth5hKG7a38m1VLbt7AYHms/a+N672IwKBgFVL
W0zoWs7av16H1x/ce4ojkY4j88Fd31FFQeK++GTwdwDfqsRiGaipvV46hE05q3Ar
hrADfOF/LNU0gS17Sbqs8hOn8h8ajeKKSH9v+XZQuvIIZf1qo7HkC9gvWguG3cCZ
/JaqJj4kZ+D9SPwOHuXOzbNOybh2QDIJ9rS1egfxAoGBAJLDAZ6ZKLz5x7jzxsh9
sRNxLiqja0/mcMNEmCLJbjkXBAMOWda1Io4WALVtFoIHBWFILLB2w/WFxBzo1xrh
/+Ysas53L7ElkXAYXdimOW1nMxrAWNo7LrxHgdVPkOHgBHin47pzEpR66nMQl8hx
rXS0ew/yf5NlfKG7BP/4TOnV
-----END PRIVATE KEY-----
";

const RSA_PUBLIC: &str = "-----BEGIN PUBLIC KEY-----
MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAhzIjZenJhglqC1sLJ/1X
WVdaa+YMVJh1guFPEPzi7X74gARWytE6KSToAS6bDTbpdNiqeWaee+8OB1Ia6RGM
W207qAXUtFH+olh6EHhfP46N3hB0vk7Q/i22fdlmzhDj5RM4/3NQLrpNb+O2obDl
GsXTFEi55ddD/7Y49tM3wRC5+qgnn5Gj1ItajzxANTErA0aQthXEmhh5D3nfajRW
nPg00cqV5blCQ8CwZ7YYlOfPSvMFdCUYr8gmMwGE28qpGMxWGttAxsAfXWdLZ2WG
G0vC92LUPYq2gu2KniGykrj7b1ub2bdchIDK8X9KRSZvlt9GUbIWkprlpFUHikFS
kwIDAQAB
-----END PUBLIC KEY-----
";

const OTHER_RSA_PRIVATE: &str = "-----BEGIN PRIVATE KEY-----
MIIEvAIBADANBgkqhkiG9w0BAQEFAASCBKYwggSiAgEAAoIBAQCy2lSMl1+IrdcM
0BwuOXTVNvtmQ5uWq35lwr1cNVlr1YTZ/s749IIOsJNwy3IVmJYt8yNSqgJ/R0vp
TlZXAPSEYoTge71ddOaXtPoAq2asflbmA4KsYnzXI0D8kLrZl7EoT3yO4CGaSDiV
a4fuNmKJ+gchesNLDxMagNS8uqFyH5ro9FQXMyvwqWK909lJULPQe6A36fIzZUow
qQo3oAQk9kVLkgBxShPNeOYHTn7clgbKUViJP7tyS0HKuwZ1uOCRGt4+kAopg4Ew
Afgsx3xl+2tPrUkkaKcqxaG/BE52aAjoQ6JtDgofawFQYSgVv5mbbp+etHtDYSpm
YWutbf3fAgMBAAECggEADngnWvBsJCycN0cm4H55ez5lfFJ/5eKd6TGmDC2svFKb
2t8Ic4+kbffPFdL/ucuMas8+zlM+vHlSJN/XkFZdcdBem6KnIUZx2Vgk2aUEO3RF
J3qlObkGDImnmkdDNpNVG8PCefScA1VQbpYyew0fT7ZQmV7LKelgTEab72DR6t+N
DfzviWw9hpnn7K7hXmL0+PyZhmEeGSDUL35B1L2I4D1ajW9PIIm+eRDkaffO7/yz
7/27G/tSRiQXMy+aWjbHTvt8UvglekNPcmVtVj8uFSH1MKO1wY20sst2VtSNIROO
YujCYVnLshQ6GBhEIZFL5TcGqcqzFj4sYD9jXoAcQQKBgQDdnIfGsbfCrVYEq5M7
ks+W3wkVyvqWYxmQArcVyQC+rQ0jj/5dHy7eNhJm1qX0YfWXabKAo+Z862OXp54E
kiw0TP5hlYDv4nKzG/a+FjqKwO28DI0ykdFhZ2OCxBEDqHYzL49fF7c1cj7W7XRi
yQDhup8SuhEOIsaQUSozhGP8LwKBgQDOmzkzkkzR5r65lrQ0ZLIzQL/2iJ5pg6xT
5iyak4qf3ccyyX01DFe1T5W+TbbiwF2dNqE0Ux/3rCmOKuWA4j1RT6k4E1teh+u8
tdk3yUWQlFhpgwJsQ26CSWk2Vd+w5OUEcAe7Q8Fj/QmWCyC2iHOErDvO59saa5Nt
D+p3g4w9UQKBgHhCNTwRvNKcFY27Pc6aQKRyrA9zcsChToHjt07PIORYLEUcIsCN
53UWiq3b1Xrknc1owkEksDMh2Y22m/2HBQ3sqi5yXuHOVMf1aNSGY4ZgY6IkfYrv
rlvZKxsPItyFUn88U+UajYUnVgp0GTByO1RDXYdgCVlObcprASertEZpAoGAEOG4
E9Gxezk6flmlEd7kfLGevds97ms26ogVPvAtVJC/lRPHqkz+4a7GEo2xEuga/hyX
oXnlU8x6fMZeiGB0GC/FKPLT9W5vwbSuMhO9HmowqzZsPUJpRjYPZcQwifi6CdnJ
l/CaXbwwS1VPb/rITZ/xJx/k1EzT+AZj5y4ViHECgYA1JT7VAkxPwH1SarFFBGhQ
vNoNSkuDg6PjQHnluwu4mgWcNbH80zvNpu+xuZLS1UAf/HkCCZSzt7hJKkNJV0Mb
7YV9Rs+QfRbYwDbs4ifw1bCaYW1O2MIn1TzjueFgK3tsQNEgcfG4uTshEt0HKkw8
y9gXtK90Kxr1SMisXEXkjA==
-----END PRIVATE KEY-----
";

const EC_PRIVATE: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg4aWlkAbwOqKBN2GF
HFijibji7DCtPD5HI90yK2QBHmShRANCAAQ4U0a9xfY1KdQlEuXITH8JxUnc3QPh
xCGfJ45crXDCpvvsjxEyVzHhd0jKp1YTRrgYu9MnwLf6Ef3UksX18uiC
-----END PRIVATE KEY-----
";

const EC_PUBLIC: &str = "-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEOFNGvcX2NSnUJRLlyEx/CcVJ3N0D
4cQhnyeOXK1wwqb77I8RMlcx4XdIyqdWE0a4GLvTJ8C3+hH91JLF9fLogg==
-----END PUBLIC KEY-----
";

const OTHER_EC_PRIVATE: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg+itbuZ6MRG8gMDCK
pLuNvARez0fDtT3MQaK/w3Ae0CahRANCAATYRnEJeO97+NiscNQ/jZW1/n419Wdf
ib9MjGzuP58vYLeq8j+6MEqaWpmpyVKcBnUtT2p9fX/37veykADVZ3fX
-----END PRIVATE KEY-----
";

/// Claims valid now for an hour, with the admin role.
fn admin_claims() -> Value {
    let now = unix_now();
    json!({ "sub": "token-test-admin", "roles": ["admin"], "iat": now, "nbf": now, "exp": now + 3600 })
}

fn sign(alg: Algorithm, key: &EncodingKey, claims: &Value) -> String {
    jsonwebtoken::encode(&Header::new(alg), claims, key).expect("signing a test token")
}

fn hs256(secret: &str, claims: &Value) -> String {
    sign(
        Algorithm::HS256,
        &EncodingKey::from_secret(secret.as_bytes()),
        claims,
    )
}

fn rs256(private_pem: &str, claims: &Value) -> String {
    let key = EncodingKey::from_rsa_pem(private_pem.as_bytes()).expect("an RSA test key");
    sign(Algorithm::RS256, &key, claims)
}

fn es256(private_pem: &str, claims: &Value) -> String {
    let key = EncodingKey::from_ec_pem(private_pem.as_bytes()).expect("an EC test key");
    sign(Algorithm::ES256, &key, claims)
}

/// A token with `{"alg":"none"}` and an empty signature, built by hand.
fn alg_none(claims: &Value) -> String {
    let header = b64url(br#"{"alg":"none","typ":"JWT"}"#);
    let body = b64url(claims.to_string().as_bytes());
    format!("{header}.{body}.")
}

/// An admin-only query: succeeds only for a verified admin.
async fn admin_query(api: &TestApp, auth: Auth) -> Resp {
    api.send(Gql::new("{ projections { name } }").auth(auth))
        .await
}

#[track_caller]
fn accepted(r: &Resp, what: &str) {
    assert_eq!(r.status, StatusCode::OK, "{what}: {}", r.text);
    assert!(!r.has_errors(), "{what}: {}", r.text);
    assert!(r.data()["projections"].is_array(), "{what}: {}", r.text);
}

#[track_caller]
fn refused(r: &Resp, what: &str) {
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{what}: {}", r.text);
    assert_eq!(r.codes(), vec!["UNAUTHENTICATED"], "{what}: {}", r.text);
    assert!(r.data().is_null(), "{what}: {}", r.text);
    assert_eq!(
        r.headers
            .get("www-authenticate")
            .and_then(|v| v.to_str().ok()),
        Some("Bearer"),
        "{what}"
    );
}

/// Asserts, on an app verifying with the public key `public_pem`, that tokens of `others`
/// (other keys and algorithms, with what they are) are refused everywhere, and so are HS256
/// tokens, signed with the shared secret or keyed by the PEM itself (algorithm confusion),
/// and `alg: none` ones.
async fn expect_only_the_public_key_verifies(
    api: &TestApp,
    claims: &Value,
    public_pem: &str,
    others: [(String, &str); 2],
) {
    let tokens = others.into_iter().chain([
        (hs256(JWT_SECRET, claims), "HS256 with a secret"),
        (hs256(public_pem, claims), "HS256 keyed by the PEM"),
        (alg_none(claims), "alg none"),
    ]);
    for (tok, what) in tokens {
        expect_refused_everywhere(api, &tok, what).await;
    }
}

/// An embedded app that verifies tokens with the public key `public_key` (PEM text or a
/// file path) instead of an HS256 secret.
async fn verifying_with(public_key: String) -> TestApp {
    TestApp::with(|c| {
        c.jwt_secret = None;
        c.jwt_public_key = Some(public_key);
    })
    .await
}

/// Asserts the admin's token `tok` (`what`) is accepted for an admin-only query.
async fn expect_accepted(api: &TestApp, tok: String, what: &str) {
    accepted(&admin_query(api, Auth::Bearer(tok)).await, what);
}

async fn expect_refused_everywhere(api: &TestApp, tok: &str, what: &str) {
    refused(&admin_query(api, Auth::Bearer(tok.to_owned())).await, what);
    // Bad credentials are not silently anonymous: even sign-up is refused.
    let r = api
        .send(
            Gql::vars(
                CREATE_USER,
                json!({ "input": { "email": "t@example.com", "displayName": "T" } }),
            )
            .bearer(tok),
        )
        .await;
    refused(&r, what);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hand_made_hs256_token_is_accepted() {
    // The control for the refusals below: the same construction, valid, verifies.
    let api = TestApp::start().await;
    expect_accepted(&api, hs256(JWT_SECRET, &admin_claims()), "valid HS256").await;
    expect_accepted(&api, admin(), "minted HS256").await;
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_tokens_are_unauthenticated() {
    let api = TestApp::start().await;
    let now = unix_now();
    let mut claims = admin_claims();
    claims["iat"] = json!(now - 7200);
    claims["nbf"] = json!(now - 7200);
    claims["exp"] = json!(now - 120);
    expect_refused_everywhere(&api, &hs256(JWT_SECRET, &claims), "expired").await;
    // Expired just beyond the 5 s leeway.
    let mut claims = admin_claims();
    claims["exp"] = json!(now - 6);
    expect_refused_everywhere(&api, &hs256(JWT_SECRET, &claims), "expired 6 s ago").await;
    // Without exp at all.
    let mut claims = admin_claims();
    claims.as_object_mut().unwrap().remove("exp");
    expect_refused_everywhere(&api, &hs256(JWT_SECRET, &claims), "no exp").await;
    assert_eq!(api.event_count().await, 0);
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_yet_valid_tokens_are_unauthenticated() {
    let api = TestApp::start().await;
    let now = unix_now();
    let mut claims = admin_claims();
    claims["nbf"] = json!(now + 3600);
    claims["exp"] = json!(now + 7200);
    expect_refused_everywhere(&api, &hs256(JWT_SECRET, &claims), "nbf in an hour").await;
    claims["nbf"] = json!(now + 60);
    expect_refused_everywhere(&api, &hs256(JWT_SECRET, &claims), "nbf in a minute").await;
    assert_eq!(api.event_count().await, 0);
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrongly_signed_tokens_are_unauthenticated() {
    let api = TestApp::start().await;
    let claims = admin_claims();
    expect_refused_everywhere(&api, &hs256("another-secret", &claims), "other secret").await;
    expect_refused_everywhere(&api, &hs256("", &claims), "empty secret").await;

    // A valid user token whose claims are swapped for admin ones, signature kept.
    let user = token("plain-user", &[]);
    let parts: Vec<&str> = user.split('.').collect();
    assert_eq!(parts.len(), 3);
    let forged = format!(
        "{}.{}.{}",
        parts[0],
        b64url(claims.to_string().as_bytes()),
        parts[2]
    );
    expect_refused_everywhere(&api, &forged, "tampered claims").await;
    // The signature stripped.
    let stripped = format!("{}.{}.", parts[0], parts[1]);
    expect_refused_everywhere(&api, &stripped, "no signature").await;
    // An RS256 token where HS256 is configured.
    expect_refused_everywhere(&api, &rs256(RSA_PRIVATE, &claims), "RS256 for HS256").await;
    assert_eq!(api.event_count().await, 0);
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alg_none_tokens_are_unauthenticated() {
    let api = TestApp::start().await;
    let claims = admin_claims();
    expect_refused_everywhere(&api, &alg_none(&claims), "alg none").await;
    for alg in ["None", "NONE", "nOnE"] {
        let header = b64url(format!(r#"{{"alg":"{alg}","typ":"JWT"}}"#).as_bytes());
        let tok = format!("{header}.{}.", b64url(claims.to_string().as_bytes()));
        expect_refused_everywhere(&api, &tok, alg).await;
    }
    assert_eq!(api.event_count().await, 0);
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_credentials_are_unauthenticated() {
    let api = TestApp::start().await;
    for value in [
        "Bearer",
        "Bearer ",
        "Bearer not.a.token",
        "Bearer abc",
        "Basic dXNlcjpwYXNzd29yZA==",
        "Token whatever",
        "",
    ] {
        let r = admin_query(&api, Auth::Raw(value.to_owned())).await;
        refused(&r, value);
    }
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rs256_tokens_verify_against_the_configured_public_key() {
    let api = verifying_with(RSA_PUBLIC.to_owned()).await;
    let claims = admin_claims();
    expect_accepted(&api, rs256(RSA_PRIVATE, &claims), "RS256").await;
    // An end user's RS256 token reaches their own account.
    let (id, _) = api.create_user("rsa@example.com", "Rsa").await;
    let now = unix_now();
    let user_claims = json!({ "sub": id.to_string(), "exp": now + 600 });
    let r = api
        .gql(
            Some(&rs256(RSA_PRIVATE, &user_claims)),
            USER,
            json!({ "id": id }),
        )
        .await;
    assert_eq!(r.ok()["user"]["email"], "rsa@example.com");

    let others = [
        (rs256(OTHER_RSA_PRIVATE, &claims), "other RSA key"),
        (es256(EC_PRIVATE, &claims), "ES256"),
    ];
    expect_only_the_public_key_verifies(&api, &claims, RSA_PUBLIC, others).await;
    let mut expired = claims.clone();
    expired["exp"] = json!(now - 120);
    expect_refused_everywhere(&api, &rs256(RSA_PRIVATE, &expired), "expired RS256").await;
    assert_eq!(api.event_count().await, 1);
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_public_key_may_be_a_file() {
    let dir = tempfile::tempdir().expect("a directory for the PEM");
    let path = dir.path().join("jwt.pub.pem");
    std::fs::write(&path, RSA_PUBLIC).expect("writing the PEM");
    let api = verifying_with(path.display().to_string()).await;
    let claims = admin_claims();
    expect_accepted(&api, rs256(RSA_PRIVATE, &claims), "RS256").await;
    expect_refused_everywhere(&api, &hs256(RSA_PUBLIC, &claims), "HS256 keyed by the PEM").await;
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn es256_tokens_verify_against_the_configured_public_key() {
    let api = verifying_with(EC_PUBLIC.to_owned()).await;
    let claims = admin_claims();
    expect_accepted(&api, es256(EC_PRIVATE, &claims), "ES256").await;
    let others = [
        (es256(OTHER_EC_PRIVATE, &claims), "other EC key"),
        (rs256(RSA_PRIVATE, &claims), "RS256"),
    ];
    expect_only_the_public_key_verifies(&api, &claims, EC_PUBLIC, others).await;
    let mut early = claims.clone();
    early["nbf"] = json!(unix_now() + 3600);
    expect_refused_everywhere(&api, &es256(EC_PRIVATE, &early), "ES256 not yet valid").await;
    assert_eq!(api.event_count().await, 0);
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_with_an_empty_subject_or_an_exp_centuries_away_are_unauthenticated() {
    let api = TestApp::start().await;
    let now = unix_now();
    for sub in ["", "   "] {
        let mut claims = admin_claims();
        claims["sub"] = json!(sub);
        expect_refused_everywhere(&api, &hs256(JWT_SECRET, &claims), "empty subject").await;
    }
    let mut claims = admin_claims();
    claims["exp"] = json!(now + 300 * 365 * 86400);
    expect_refused_everywhere(&api, &hs256(JWT_SECRET, &claims), "exp in 300 years").await;
    // Just over the accepted lifetime (24 h by default, and the 5 s leeway).
    claims["exp"] = json!(now + 24 * 3600 + 60);
    expect_refused_everywhere(&api, &hs256(JWT_SECRET, &claims), "exp in 24 h 1 min").await;
    assert_eq!(api.event_count().await, 0);
    // Within it, accepted.
    claims["exp"] = json!(now + 23 * 3600);
    let r = api
        .send(Gql::new("{ __typename }").bearer(&hs256(JWT_SECRET, &claims)))
        .await;
    assert_eq!(r.ok()["__typename"], "Query");
    api.stop().await;

    // The accepted lifetime is configurable.
    let api = TestApp::with(|c| c.jwt_max_ttl = Duration::from_secs(600)).await;
    claims["exp"] = json!(now + 3600);
    expect_refused_everywhere(
        &api,
        &hs256(JWT_SECRET, &claims),
        "an hour over a 10 min cap",
    )
    .await;
    api.stop().await;
}
