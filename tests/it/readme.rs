//! The README's first mutation and query (section "A first mutation and query") work as
//! written: the two `curl` commands are read from README.md, with their URL path, headers and
//! bodies, and sent to an embedded app started without a JWT secret, the bearer token being the
//! development admin token such an app prints, as the README tells the reader to use it.

use crate::support::*;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use serde_json::{json, Value};
use std::collections::BTreeMap;

const SECTION: &str = "## A first mutation and query";

/// One `curl` command of the README: where it posts, its headers and its body.
#[derive(Debug)]
struct Curl {
    path: String,
    headers: Vec<(String, String)>,
    body: String,
}

impl Curl {
    /// The request the command makes, against the router instead of the address.
    fn request(&self) -> Request<Body> {
        let mut request = Request::post(self.path.as_str());
        for (name, value) in &self.headers {
            request = request.header(name.as_str(), value.as_str());
        }
        request
            .body(Body::from(self.body.clone()))
            .expect("a request")
    }
}

/// The shell code blocks of the section, as written.
fn section_shell_code(readme: &str) -> String {
    let start = readme
        .find(SECTION)
        .unwrap_or_else(|| panic!("README.md has no section {SECTION:?}"));
    let rest = &readme[start + SECTION.len()..];
    let section = &rest[..rest.find("\n## ").unwrap_or(rest.len())];
    let mut code = String::new();
    let mut blocks = section.split("```").skip(1).step_by(2);
    for block in blocks.by_ref() {
        if let Some(body) = block.strip_prefix("sh\n") {
            code.push_str(body);
        }
    }
    assert!(!code.is_empty(), "no ```sh block in {SECTION:?}");
    code
}

/// Splits shell text into words, as `sh` does for what the README uses: single quotes kept
/// literally, double quotes with `$NAME` expanded from `vars`, backslash-newline joining
/// lines, `#` comments, and one command per line.
fn shell_commands(code: &str, vars: &BTreeMap<&str, String>) -> Vec<Vec<String>> {
    let mut commands = Vec::new();
    let mut words: Vec<String> = Vec::new();
    let mut word: Option<String> = None;
    let mut chars = code.chars().peekable();
    let end_word = |word: &mut Option<String>, words: &mut Vec<String>| {
        if let Some(w) = word.take() {
            words.push(w);
        }
    };
    while let Some(c) = chars.next() {
        match c {
            '\'' => {
                let w = word.get_or_insert_with(String::new);
                for c in chars.by_ref() {
                    if c == '\'' {
                        break;
                    }
                    w.push(c);
                }
            }
            '"' => {
                let w = word.get_or_insert_with(String::new);
                while let Some(c) = chars.next() {
                    match c {
                        '"' => break,
                        '$' => {
                            let mut name = String::new();
                            while let Some(&n) = chars.peek() {
                                if !(n.is_ascii_alphanumeric() || n == '_') {
                                    break;
                                }
                                name.push(n);
                                chars.next();
                            }
                            let value = vars
                                .get(name.as_str())
                                .unwrap_or_else(|| panic!("README uses ${name}, which is unset"));
                            w.push_str(value);
                        }
                        '\\' => w.extend(chars.next()),
                        c => w.push(c),
                    }
                }
            }
            '\\' if chars.peek() == Some(&'\n') => {
                chars.next();
                end_word(&mut word, &mut words);
            }
            '#' if word.is_none() => {
                for c in chars.by_ref() {
                    if c == '\n' {
                        break;
                    }
                }
                commands.push(std::mem::take(&mut words));
            }
            '\n' => {
                end_word(&mut word, &mut words);
                commands.push(std::mem::take(&mut words));
            }
            c if c.is_whitespace() => end_word(&mut word, &mut words),
            c => word.get_or_insert_with(String::new).push(c),
        }
    }
    end_word(&mut word, &mut words);
    commands.push(words);
    commands.retain(|c| !c.is_empty());
    commands
}

/// The `curl` commands among `commands`.
fn curls(commands: &[Vec<String>]) -> Vec<Curl> {
    commands
        .iter()
        .filter(|words| words[0] == "curl")
        .map(|words| {
            let mut curl = Curl {
                path: String::new(),
                headers: Vec::new(),
                body: String::new(),
            };
            let mut args = words[1..].iter();
            while let Some(arg) = args.next() {
                match arg.as_str() {
                    "-s" => {}
                    "-H" => {
                        let header = args.next().expect("a header after -H");
                        let (name, value) = header
                            .split_once(':')
                            .unwrap_or_else(|| panic!("a header is name: value, not {header}"));
                        curl.headers
                            .push((name.trim().to_owned(), value.trim().to_owned()));
                    }
                    "-d" => curl.body = args.next().expect("a body after -d").clone(),
                    url if url.starts_with("http://") => {
                        let after_scheme = &url["http://".len()..];
                        let path = &after_scheme[after_scheme.find('/').unwrap_or(0)..];
                        curl.path = path.to_owned();
                    }
                    other => panic!("an option of curl this test does not know: {other}"),
                }
            }
            curl
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readmes_first_mutation_and_query_work_as_written() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md exists");
    let code = section_shell_code(&readme);
    // No secret configured: the app signs with a random one and has a development token.
    let app = TestApp::with(|config| config.jwt_secret = None).await;
    run(app, async |app| {
        let token = app
            .app()
            .dev_token
            .clone()
            .expect("a development admin token without a secret");
        let vars = BTreeMap::from([("TOKEN", token)]);
        let curls = curls(&shell_commands(&code, &vars));
        assert_eq!(
            curls.len(),
            2,
            "two curl commands in {SECTION:?}: {curls:?}"
        );

        let created = app.send_request(curls[0].request()).await;
        let data = created.ok();
        assert_eq!(data["createUser"]["version"], 1, "{}", created.text);
        assert_eq!(data["createUser"]["user"]["email"], "ada@example.com");
        let id = data["createUser"]["user"]["id"]
            .as_str()
            .expect("createUser answers the user's id");

        let mut query: Value = serde_json::from_str(&curls[1].body).unwrap_or_else(|e| {
            panic!(
                "the second curl's body is not JSON ({e}): {}",
                curls[1].body
            )
        });
        assert_eq!(
            query["variables"]["id"], "<the id above>",
            "the README's query takes the id of the first answer"
        );
        query["variables"]["id"] = json!(id);
        let read = Curl {
            body: query.to_string(),
            path: curls[1].path.clone(),
            headers: curls[1].headers.clone(),
        };
        let answer = app.send_request(read.request()).await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.text);
        assert_eq!(
            answer.body,
            json!({ "data": { "user": { "displayName": "Ada", "version": 1 } } }),
            "{}",
            answer.text
        );
    })
    .await;
}
