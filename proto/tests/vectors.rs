//! The test vectors of `docs/protocol.md`, recomputed from the code.
//!
//! The document is the contract a client is written from, so its vectors are read straight out of
//! it (fenced blocks whose info string is `json scm-vector NAME`): if the code or the document
//! changes alone, this fails. The expected values were computed independently of this crate
//! (Python's `hmac`/`hashlib`), and each transcript, salt and info in the document is checked both
//! against the code's MAC or key and against a plain re-encoding here, so the prose description
//! of the encoding is tested too, not only the code against itself.

use std::collections::BTreeMap;

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use hmac::{Hmac, Mac as _};
use scm_proto::crypto::{
    self, BindingTranscript, LoginTranscript, SessionId, SessionKey, SharedKey, binding_mac,
    derive_session_key, login_mac, session_tag, verify_binding_mac, verify_login_mac,
};
use scm_proto::preamble::{HEADER_LEN, Preamble, REPLY_HEADER_LEN, Reply, Status};
use scm_proto::version::AppVersion;
use serde_json::Value;
use sha2::{Digest as _, Sha256};

const DOC: &str = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/protocol.md"));
const MARKER: &str = "```json scm-vector ";

/// Every vector the document must carry.
const EXPECTED: [&str; 7] = [
    "login_mac",
    "session_key",
    "binding_mac",
    "session_tag",
    "preamble",
    "replies",
    "versions",
];

/// The document's vector blocks by name.
fn vectors() -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    let mut lines = DOC.lines();
    while let Some(line) = lines.next() {
        let Some(name) = line.trim().strip_prefix(MARKER) else {
            continue;
        };
        let body: Vec<&str> = lines.by_ref().take_while(|l| l.trim() != "```").collect();
        let value: Value = serde_json::from_str(&body.join("\n"))
            .unwrap_or_else(|e| panic!("vector {name} in docs/protocol.md is not JSON: {e}"));
        assert!(
            out.insert(name.trim().to_owned(), value).is_none(),
            "vector {name} appears twice in docs/protocol.md"
        );
    }
    out
}

fn vector(name: &str) -> Value {
    vectors()
        .remove(name)
        .unwrap_or_else(|| panic!("docs/protocol.md has no `{MARKER}{name}` block"))
}

fn text<'a>(v: &'a Value, field: &str) -> &'a str {
    v[field]
        .as_str()
        .unwrap_or_else(|| panic!("vector field {field} is missing or not a string"))
}

fn bytes(v: &Value, field: &str) -> Vec<u8> {
    hex::decode(text(v, field)).unwrap_or_else(|e| panic!("vector field {field}: {e}"))
}

fn array32(v: &Value, field: &str) -> [u8; 32] {
    bytes(v, field)
        .try_into()
        .unwrap_or_else(|_| panic!("vector field {field} is not 32 bytes"))
}

/// The transcript encoding as the document states it, written here without the crate's helper:
/// each of the label and the fields as `u32be(len) || bytes`.
fn transcript(label: &str, fields: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
    for f in std::iter::once(&label.as_bytes()).chain(fields) {
        out.extend_from_slice(&u32::try_from(f.len()).unwrap().to_be_bytes());
        out.extend_from_slice(f);
    }
    out
}

fn hmac_sha256(key: &[u8], msg: &[u8]) -> [u8; 32] {
    let mut m = <Hmac<Sha256>>::new_from_slice(key).unwrap();
    m.update(msg);
    m.finalize().into_bytes().into()
}

#[test]
fn the_document_carries_every_vector() {
    let names: Vec<String> = vectors().into_keys().collect();
    for want in EXPECTED {
        assert!(
            names.iter().any(|n| n == want),
            "missing vector {want}; found {names:?}"
        );
    }
    assert_eq!(names.len(), EXPECTED.len(), "unexpected vectors: {names:?}");
}

#[test]
fn login_mac_vector() {
    let v = vector("login_mac");
    let shared = array32(&v, "shared_key_hex");
    let server_nonce = array32(&v, "server_nonce_hex");
    let client_nonce = array32(&v, "client_nonce_hex");
    // The JSON bodies carry these as padded standard base64.
    assert_eq!(STANDARD.encode(shared), text(&v, "shared_key_base64"));
    assert_eq!(
        STANDARD.encode(server_nonce),
        text(&v, "server_nonce_base64")
    );
    assert_eq!(
        STANDARD.encode(client_nonce),
        text(&v, "client_nonce_base64")
    );
    let key = SharedKey::from_b64(text(&v, "shared_key_base64")).unwrap();
    assert_eq!(key.as_bytes(), &shared);

    let t = LoginTranscript {
        challenge_id: text(&v, "challenge_id"),
        server_nonce: &server_nonce,
        client_nonce: &client_nonce,
        username: text(&v, "username"),
        key_id: text(&v, "key_id"),
        device_id: text(&v, "device_id"),
        app_id: text(&v, "app_id"),
        app_version: text(&v, "app_version"),
    };
    let doc_transcript = bytes(&v, "transcript_hex");
    assert_eq!(
        transcript(
            "scm login proof v1",
            &[
                t.challenge_id.as_bytes(),
                &server_nonce,
                &client_nonce,
                t.username.as_bytes(),
                t.key_id.as_bytes(),
                t.device_id.as_bytes(),
                t.app_id.as_bytes(),
                t.app_version.as_bytes(),
            ],
        ),
        doc_transcript,
        "the document's login transcript is not the stated encoding"
    );
    let mac = login_mac(&key, &t);
    assert_eq!(hex::encode(mac), text(&v, "mac_hex"));
    assert_eq!(hmac_sha256(&shared, &doc_transcript), mac);
    assert_eq!(crypto::b64(&mac), text(&v, "mac_base64"));
    assert!(verify_login_mac(&key, &t, &mac));
}

/// The annotated login transcript (one `lp()` field a line, comments after `#`) spells out the
/// same bytes as the vector.
#[test]
fn annotated_login_transcript() {
    let start = DOC
        .find("```text scm-transcript login_mac")
        .expect("docs/protocol.md has the annotated login transcript");
    let block = DOC[start..]
        .lines()
        .skip(1)
        .take_while(|l| l.trim() != "```");
    let mut hex_text = String::new();
    let mut lines = 0;
    for line in block {
        let data = line.split('#').next().unwrap_or("");
        let mut words = data.split_whitespace();
        let len = u32::from_str_radix(words.next().expect("a length"), 16).unwrap();
        let field: String = words.collect();
        assert_eq!(field.len(), 2 * len as usize, "length prefix of {line:?}");
        hex_text.push_str(&format!("{len:08x}{field}"));
        lines += 1;
    }
    assert_eq!(lines, 9, "label and eight fields");
    assert_eq!(hex_text, text(&vector("login_mac"), "transcript_hex"));
}

#[test]
fn session_key_vector() {
    let v = vector("session_key");
    let shared = SharedKey(array32(&v, "shared_key_hex"));
    let server_nonce = array32(&v, "server_nonce_hex");
    let client_nonce = array32(&v, "client_nonce_hex");
    let id_text = text(&v, "session_id");
    // The session id is unpadded base64url of 32 random bytes.
    assert_eq!(
        URL_SAFE_NO_PAD.encode(bytes(&v, "session_id_bytes_hex")),
        id_text
    );
    let id = SessionId::parse(id_text).expect("the vector's session id is well formed");

    let salt = bytes(&v, "salt_hex");
    let info = bytes(&v, "info_hex");
    assert_eq!(salt, [server_nonce, client_nonce].concat());
    assert_eq!(
        info,
        [b"scm session key v1".as_slice(), id_text.as_bytes()].concat()
    );

    let key = derive_session_key(&shared, &server_nonce, &client_nonce, &id);
    assert_eq!(hex::encode(key.as_bytes()), text(&v, "session_key_hex"));
    assert_eq!(key.to_b64(), text(&v, "session_key_base64"));
    // RFC 5869 over the document's salt and info, and its intermediate PRK.
    let (prk, hk) = hkdf::Hkdf::<Sha256>::extract(Some(&salt), shared.as_bytes());
    assert_eq!(hex::encode(prk), text(&v, "prk_hex"));
    let mut okm = [0u8; 32];
    hk.expand(&info, &mut okm).unwrap();
    assert_eq!(&okm, key.as_bytes());
}

#[test]
fn binding_mac_vector() {
    let v = vector("binding_mac");
    assert_eq!(
        text(&v, "exporter_label").as_bytes(),
        scm_proto::BINDING_EXPORTER_LABEL
    );
    assert_eq!(
        v["exporter_len"].as_u64(),
        Some(scm_proto::BINDING_EXPORTER_LEN as u64)
    );
    let key = SessionKey(array32(&v, "session_key_hex"));
    let exporter = bytes(&v, "exporter_hex");
    let t = BindingTranscript {
        exporter: &exporter,
        session_id: text(&v, "session_id"),
        app_id: text(&v, "app_id"),
        app_version: text(&v, "app_version"),
        device_id: text(&v, "device_id"),
        resource: text(&v, "resource"),
    };
    let doc_transcript = bytes(&v, "transcript_hex");
    assert_eq!(
        transcript(
            "scm channel binding v1",
            &[
                &exporter,
                t.session_id.as_bytes(),
                t.app_id.as_bytes(),
                t.app_version.as_bytes(),
                t.device_id.as_bytes(),
                t.resource.as_bytes(),
            ],
        ),
        doc_transcript,
        "the document's binding transcript is not the stated encoding"
    );
    let mac = binding_mac(&key, &t);
    assert_eq!(hex::encode(mac), text(&v, "mac_hex"));
    assert_eq!(hmac_sha256(key.as_bytes(), &doc_transcript), mac);
    assert!(verify_binding_mac(&key, &t, &mac));
}

#[test]
fn session_tag_vector() {
    let v = vector("session_tag");
    let id = text(&v, "session_id");
    let input = bytes(&v, "sha256_input_hex");
    assert_eq!(
        input,
        [b"scm session tag v1".as_slice(), id.as_bytes()].concat()
    );
    let tag = session_tag(id);
    assert_eq!(tag.0, text(&v, "tag"));
    assert_eq!(hex::encode(&Sha256::digest(&input)[..16]), tag.0);
    assert_eq!(SessionId::parse(id).unwrap().tag(), tag);
}

#[test]
fn preamble_vector() {
    let v = vector("preamble");
    let p = Preamble {
        session_id: text(&v, "session_id").to_owned(),
        app_id: text(&v, "app_id").to_owned(),
        app_version: text(&v, "app_version").to_owned(),
        device_id: text(&v, "device_id").to_owned(),
        resource: text(&v, "resource").to_owned(),
        mac: array32(&v, "mac_hex"),
    };
    let frame = bytes(&v, "frame_hex");
    assert_eq!(hex::encode(p.encode().unwrap()), text(&v, "frame_hex"));
    assert_eq!(Preamble::decode(&frame).unwrap(), p);
    let header: [u8; HEADER_LEN] = frame[..HEADER_LEN].try_into().unwrap();
    assert_eq!(
        scm_proto::preamble::body_len(&header).unwrap() as u64,
        v["body_len"].as_u64().unwrap()
    );
}

/// `Preamble::sign` (the device) and `Preamble::verify` (the proxy) over the binding vector's
/// fields give the documented MAC and the documented frame.
#[test]
fn preamble_sign_and_verify_vector() {
    let b = vector("binding_mac");
    let key = SessionKey(array32(&b, "session_key_hex"));
    let exporter = bytes(&b, "exporter_hex");
    let p = Preamble {
        session_id: text(&b, "session_id").to_owned(),
        app_id: text(&b, "app_id").to_owned(),
        app_version: text(&b, "app_version").to_owned(),
        device_id: text(&b, "device_id").to_owned(),
        resource: text(&b, "resource").to_owned(),
        mac: [0; 32],
    }
    .signed(&key, &exporter);
    assert_eq!(hex::encode(p.mac), text(&b, "mac_hex"));
    assert_eq!(
        hex::encode(p.encode().unwrap()),
        text(&vector("preamble"), "frame_hex")
    );
    let received = Preamble::decode(&bytes(&vector("preamble"), "frame_hex")).unwrap();
    assert!(received.verify(&key, &exporter));
    let mut other = exporter.clone();
    other[0] ^= 1;
    assert!(
        !received.verify(&key, &other),
        "another connection's exporter"
    );
}

#[test]
fn reply_vectors() {
    let v = vector("replies");
    let list = v.as_array().expect("replies is a list");
    assert!(!list.is_empty());
    for r in list {
        let code = text(r, "status");
        let number = r["status_byte"].as_u64().unwrap();
        let status = Status::from_u8(u8::try_from(number).unwrap()).unwrap();
        assert_eq!(status.code(), code);
        let reply = Reply {
            status,
            reason: text(r, "reason").to_owned(),
        };
        let frame = bytes(r, "frame_hex");
        assert_eq!(hex::encode(reply.encode()), text(r, "frame_hex"));
        let header: [u8; REPLY_HEADER_LEN] = frame[..REPLY_HEADER_LEN].try_into().unwrap();
        let (s, len) = Reply::decode_header(&header).unwrap();
        assert_eq!((s, len), (status, frame.len() - REPLY_HEADER_LEN));
        assert_eq!(&frame[REPLY_HEADER_LEN..], reply.reason.as_bytes());
    }
}

#[test]
fn version_vectors() {
    let v = vector("versions");
    for pair in v["ordered"].as_array().unwrap() {
        let [a, op, b] = pair.as_array().unwrap().as_slice() else {
            panic!("ordered entries are [a, op, b]")
        };
        let (a, b) = (
            AppVersion::parse(a.as_str().unwrap()).unwrap(),
            AppVersion::parse(b.as_str().unwrap()).unwrap(),
        );
        let got = match a.cmp(&b) {
            std::cmp::Ordering::Less => "<",
            std::cmp::Ordering::Equal => "==",
            std::cmp::Ordering::Greater => ">",
        };
        assert_eq!(got, op.as_str().unwrap(), "{a} vs {b}");
    }
    for ok in v["valid"].as_array().unwrap() {
        let ok = ok.as_str().unwrap();
        assert!(AppVersion::parse(ok).is_ok(), "{ok:?} should be valid");
    }
    for bad in v["invalid"].as_array().unwrap() {
        let bad = bad.as_str().unwrap();
        assert!(AppVersion::parse(bad).is_err(), "{bad:?} should be refused");
    }
}

/// The encoding rules the document states beside the vectors.
#[test]
fn encoding_rules() {
    let bytes32 = [0xfbu8; 32];
    let padded = STANDARD.encode(bytes32);
    assert!(padded.ends_with('=') && padded.contains('+') && padded.contains('/'));
    // JSON binary values: standard alphabet, padding required.
    assert!(crypto::decode_fixed::<32>("x", &padded).is_ok());
    assert!(crypto::decode_fixed::<32>("x", padded.trim_end_matches('=')).is_err());
    let url_safe = padded.replace('+', "-").replace('/', "_");
    assert!(crypto::decode_fixed::<32>("x", &url_safe).is_err());
    // Session ids: URL-safe alphabet, no padding, exactly 43 characters.
    let id = URL_SAFE_NO_PAD.encode(bytes32);
    assert_eq!(id.len(), SessionId::ENCODED_LEN);
    assert!(SessionId::parse(&id).is_some());
    assert!(SessionId::parse(&format!("{id}=")).is_none());
    assert!(SessionId::parse(&id.replace('-', "+").replace('_', "/")).is_none());
}
