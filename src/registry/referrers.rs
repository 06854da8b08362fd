//! Sink stage after the image push: attach SBOM and provenance documents as OCI 1.1
//! referrers of each platform manifest (distribution-spec 1.1 "Pushing Manifests with
//! Subject", "Listing Referrers", "Referrers Tag Schema").
//!
//! Per subject, the list of its referrers is read first: when `GET /v2/<name>/referrers/<digest>`
//! answers with an image index, the registry keeps the list itself, and only the documents it
//! does not list yet are pushed (the empty config and the document blob, HEAD-skip, upload,
//! then the referrer manifest by digest). Otherwise the list lives in the tag `sha256-<hex>` of
//! the subject: it is read, the entries imgbuild wrote for the same kind of document are
//! replaced by the new ones, everything else (other tools' referrers) is kept, and only if that
//! changed anything are the missing documents pushed and the tag written — so pushing the same
//! image again writes nothing.
//!
//! All subjects go together, one wave of concurrent requests per step (read the lists, the
//! blobs, the referrer manifests, the tags; see [`attach`]): a cold attach waits for six round
//! trips however many platforms the image has.

use super::RegistryError;
use super::client::{Client, display_url, is_html, unexpected};
use super::upload::{blob_exists, push_bytes, put_manifest};
use crate::digest::Digest;
use crate::image::{JsonBlob, MEDIA_TYPE_INDEX};
use crate::progress::{Event, Progress};
use crate::supply::{ANNOTATION_KIND, Attachment, empty_config};
use bytes::Bytes;
use reqwest::StatusCode;
use reqwest::header::ACCEPT;
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashSet};

/// What attaching did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AttachReport {
    /// Referrer manifests pushed (by digest; a registry that had one already is not an error).
    pub manifests: Vec<Digest>,
    /// Subjects whose registry has the referrers API.
    pub via_api: Vec<Digest>,
    /// Referrers tags written (`sha256-<hex>`); a tag already right is not rewritten.
    pub tags_written: Vec<String>,
}

/// Push `attachments` and list them as referrers of their subjects, in waves of concurrent
/// requests (a registry is often 20-80 ms away):
///
/// 1. every subject's referrers, asked both ways at once: the API and the referrers tag
///    (which of the two the registry keeps is only known from the answers, and asking one
///    after the other would cost a round trip on every registry of the other kind); beside
///    them, unless `likely_present`, a HEAD for every blob the documents need;
/// 2. the blobs not listed yet (empty config once, documents): POST, PUT, confirming HEAD
///    (with `likely_present`, a HEAD first: they are probably there);
/// 3. every referrer manifest the lists lack;
/// 4. every referrers tag whose merged list changed (never before the manifests it lists).
///
/// What a subject already lists (the same referrer manifests, by digest) is not pushed again:
/// a re-push of the same image reads the lists and writes nothing. `likely_present`: the
/// image was already tagged in the repository (its referrers are then probably there too).
pub(crate) async fn attach(
    client: &Client,
    attachments: &[Attachment],
    likely_present: bool,
    progress: &dyn Progress,
) -> Result<AttachReport, RegistryError> {
    let mut report = AttachReport::default();
    let mut subjects: Vec<&Digest> = Vec::new();
    for a in attachments {
        if !subjects.contains(&&a.subject.digest) {
            subjects.push(&a.subject.digest);
        }
    }
    if subjects.is_empty() {
        return Ok(report);
    }
    // Every blob a referrer manifest names, each digest once (the empty config is shared).
    let mut blobs = vec![empty_config()];
    blobs.extend(attachments.iter().map(|a| a.document.clone()));
    let mut seen = HashSet::new();
    blobs.retain(|b| seen.insert(b.digest.clone()));

    // Wave 1: the lists, and (for a new image) which blobs the registry has.
    let api = futures::future::join_all(
        subjects
            .iter()
            .map(|s| referrers_api_index(client, s, progress)),
    );
    let tags = futures::future::join_all(
        subjects
            .iter()
            .map(|s| async move { get_tag_index(client, &tag_for(s), progress).await }),
    );
    let heads = async {
        if likely_present {
            return Ok(None);
        }
        futures::future::try_join_all(blobs.iter().map(|b| async move {
            let what = format!("blob {}", b.digest);
            client
                .retry(&what, progress, || blob_exists(client, &b.digest))
                .await
        }))
        .await
        .map(Some)
    };
    let (api, tags, heads) = futures::join!(api, tags, heads);
    let heads = heads?;
    let api = api.into_iter().collect::<Result<Vec<_>, _>>()?;
    // A registry with the API answers it for every subject (an empty list for one with no
    // referrers yet); the tags are then not its list, and an error reading them is moot.
    let has_api = api.iter().any(Option::is_some);

    let mut missing: Vec<&Attachment> = Vec::new();
    let mut tag_writes: Vec<(String, JsonBlob)> = Vec::new();
    for ((subject, index), tag_read) in subjects.iter().zip(api).zip(tags) {
        let ours: Vec<&Attachment> = attachments
            .iter()
            .filter(|a| &a.subject.digest == *subject)
            .collect();
        if has_api {
            // The registry keeps the list: push what it does not list yet.
            let lacking: Vec<&Attachment> = ours
                .iter()
                .copied()
                .filter(|a| !index.as_ref().is_some_and(|i| lists(i, &a.manifest.digest)))
                .collect();
            if lacking.is_empty() {
                progress.event(Event::Debug(&format!(
                    "the referrers of {subject} already include these documents"
                )));
            }
            missing.extend(lacking);
            report.via_api.push((*subject).clone());
            continue;
        }
        let tag = tag_for(subject);
        let existing = tag_read?;
        let merged = merge(existing.as_ref().map(|(v, _)| v), &ours);
        let bytes = Bytes::from(serde_json::to_vec(&merged).unwrap_or_default());
        if existing.as_ref().is_some_and(|(_, b)| *b == bytes) {
            progress.event(Event::Debug(&format!(
                "referrers tag {tag} already lists these documents"
            )));
            continue;
        }
        // Our manifests the tag does not list yet go first: a tag never lists what is not there.
        missing.extend(ours.iter().copied().filter(|a| {
            !existing
                .as_ref()
                .is_some_and(|(v, _)| lists(v, &a.manifest.digest))
        }));
        let index = JsonBlob {
            media_type: MEDIA_TYPE_INDEX.into(),
            digest: Digest::of(&bytes),
            bytes,
        };
        tag_writes.push((tag, index));
    }

    if !missing.is_empty() {
        // Wave 2: the blobs of the missing documents (and the empty config), each once.
        let needed: HashSet<&Digest> = missing
            .iter()
            .map(|a| &a.document.digest)
            .chain([&blobs[0].digest])
            .collect();
        let pushes = blobs
            .iter()
            .enumerate()
            .filter(|(_, b)| needed.contains(&b.digest))
            .map(|(i, b)| {
                let present = heads.as_ref().map(|h| h[i]);
                async move {
                    if present == Some(true) {
                        progress.event(Event::BlobSkipped {
                            digest: &b.digest,
                            size: b.bytes.len() as u64,
                            reason: "already in the registry",
                        });
                        return Ok(false);
                    }
                    // Absent by the HEAD of wave 1: no second HEAD before the upload.
                    push_bytes(client, b, present == Some(false), progress).await
                }
            });
        futures::future::try_join_all(pushes).await?;
        // Wave 3: the referrer manifests, all at once.
        futures::future::try_join_all(missing.iter().map(|a| async move {
            let reference = a.manifest.digest.to_string();
            put_manifest(client, &a.manifest, &reference, progress).await
        }))
        .await?;
        report
            .manifests
            .extend(missing.iter().map(|a| a.manifest.digest.clone()));
    }
    // Wave 4: the referrers tags whose list changed.
    futures::future::try_join_all(
        tag_writes
            .iter()
            .map(|(tag, index)| put_manifest(client, index, tag, progress)),
    )
    .await?;
    report
        .tags_written
        .extend(tag_writes.into_iter().map(|(tag, _)| tag));
    Ok(report)
}

/// Does the referrers index `index` list the manifest `digest`?
fn lists(index: &Value, digest: &Digest) -> bool {
    let d = digest.to_string();
    index["manifests"]
        .as_array()
        .is_some_and(|m| m.iter().any(|e| e["digest"] == d.as_str()))
}

/// The referrers of `subject` (descriptors): from the referrers API when the registry has
/// it, else from the referrers tag (none when neither has any).
pub async fn list(
    puller: &super::pull::Puller,
    subject: &Digest,
    progress: &dyn Progress,
) -> Result<Vec<Value>, RegistryError> {
    let client = puller.client();
    let api = referrers_api_index(client, subject, progress).await?;
    let index = match api {
        Some(v) => Some(v),
        None => get_tag_index(client, &tag_for(subject), progress)
            .await?
            .map(|(v, _)| v),
    };
    Ok(index
        .and_then(|v| v["manifests"].as_array().cloned())
        .unwrap_or_default())
}

fn no_referrers_api(status: StatusCode) -> bool {
    [
        StatusCode::NOT_FOUND,
        StatusCode::BAD_REQUEST,
        StatusCode::METHOD_NOT_ALLOWED,
    ]
    .contains(&status)
}

/// The referrers tag of a subject: its digest with `:` as `-` (distribution-spec
/// "Referrers Tag Schema": `<alg>-<ref>`).
pub fn tag_for(subject: &Digest) -> String {
    format!("sha256-{}", subject.hex())
}

/// The referrers index: `existing`'s entries minus what imgbuild wrote before for the same
/// kind of document (or the same digests), then ours, in a stable order.
pub fn merge(existing: Option<&Value>, ours: &[&Attachment]) -> Value {
    let our_digests: HashSet<String> = ours.iter().map(|a| a.manifest.digest.to_string()).collect();
    let our_kinds: HashSet<&str> = ours.iter().map(|a| a.kind.name()).collect();
    let mut manifests: Vec<Value> = existing
        .and_then(|v| v["manifests"].as_array())
        .into_iter()
        .flatten()
        .filter(|d| {
            let digest = d["digest"].as_str().unwrap_or_default();
            let kind = d["annotations"][ANNOTATION_KIND].as_str();
            !our_digests.contains(digest) && !kind.is_some_and(|k| our_kinds.contains(k))
        })
        .cloned()
        .collect();
    let mut sorted: Vec<&&Attachment> = ours.iter().collect();
    sorted.sort_by_key(|a| a.kind);
    manifests.extend(sorted.iter().map(|a| a.referrer_descriptor()));
    let mut index = json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_TYPE_INDEX,
        "manifests": manifests,
    });
    // Keep whatever else another tool put at the top level (annotations).
    if let Some(Value::Object(old)) = existing {
        let extra: BTreeMap<&String, &Value> = old
            .iter()
            .filter(|(k, _)| !["schemaVersion", "mediaType", "manifests"].contains(&k.as_str()))
            .collect();
        for (k, v) in extra {
            index[k.as_str()] = v.clone();
        }
    }
    index
}

/// `GET /v2/<name>/referrers/<digest>`: the image index it answers when the registry has the
/// API; None when it does not (404, or any other client error: registries without the
/// endpoint answer 400/404/405). Anything else (429, 5xx) goes to the retry policy.
async fn referrers_api_index(
    client: &Client,
    subject: &Digest,
    progress: &dyn Progress,
) -> Result<Option<Value>, RegistryError> {
    let url = client.repo_url(&format!("referrers/{subject}"));
    client
        .retry(&format!("referrers of {subject}"), progress, || async {
            let response = client
                .send(|http| {
                    Ok(http
                        .get(url.clone())
                        .header(ACCEPT, MEDIA_TYPE_INDEX)
                        .timeout(client.timeout()))
                })
                .await?;
            let status = response.status();
            if status == StatusCode::OK && !is_html(response.headers()) {
                let body = response.bytes().await.unwrap_or_default();
                let v: Value = serde_json::from_slice(&body).unwrap_or_default();
                return Ok(v["manifests"].is_array().then_some(v));
            }
            if no_referrers_api(status) {
                return Ok(None);
            }
            Err(unexpected(&url, response).await)
        })
        .await
}

/// The index in the referrers tag (parsed, and its bytes), or None when there is no such tag.
async fn get_tag_index(
    client: &Client,
    tag: &str,
    progress: &dyn Progress,
) -> Result<Option<(Value, Bytes)>, RegistryError> {
    let url = client.repo_url(&format!("manifests/{tag}"));
    client
        .retry(&format!("referrers tag {tag}"), progress, || async {
            let response = client
                .send(|http| {
                    // Every manifest type: a registry hides a manifest whose type the
                    // client does not accept (404), and the tag must not be overwritten
                    // blindly when it holds something else.
                    Ok(http
                        .get(url.clone())
                        .header(ACCEPT, super::pull::MANIFEST_ACCEPT.join(", "))
                        .timeout(client.timeout()))
                })
                .await?;
            match response.status() {
                StatusCode::NOT_FOUND => Ok(None),
                StatusCode::OK if !is_html(response.headers()) => {
                    let bytes = response.bytes().await.map_err(|e| {
                        super::client::transport_error(&url, e, client.timeout())
                    })?;
                    match serde_json::from_slice::<Value>(&bytes) {
                        Ok(v) if v["manifests"].is_array() => Ok(Some((v, bytes))),
                        _ => Err(RegistryError::Protocol {
                            url: display_url(&url),
                            status: 200,
                            body_snippet: "the referrers tag does not hold an image index; delete the tag or let it be rewritten by hand".into(),
                            retry_after: None,
                        }),
                    }
                }
                _ => Err(unexpected(&url, response).await),
            }
        })
        .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::{Descriptor, MEDIA_TYPE_MANIFEST};
    use crate::platform::Platform;
    use crate::supply::{Kind, attachment};

    #[test]
    fn merge_keeps_other_tools_and_replaces_ours() {
        let p = Platform::new("linux", "amd64", None);
        let subject = Descriptor::new(MEDIA_TYPE_MANIFEST, Digest::of(b"m"), 1);
        let old = attachment(&p, Kind::Sbom, &subject, b"{\"v\":1}".to_vec(), 0).unwrap();
        let new = attachment(&p, Kind::Sbom, &subject, b"{\"v\":2}".to_vec(), 0).unwrap();
        let prov = attachment(&p, Kind::Provenance, &subject, b"{}".to_vec(), 0).unwrap();
        let other = json!({
            "mediaType": MEDIA_TYPE_MANIFEST,
            "digest": Digest::of(b"cosign").to_string(),
            "size": 9,
            "artifactType": "application/vnd.dev.cosign.artifact.sig.v1+json",
        });
        let existing = json!({
            "schemaVersion": 2,
            "mediaType": MEDIA_TYPE_INDEX,
            "manifests": [other.clone(), old.referrer_descriptor()],
        });
        let merged = merge(Some(&existing), &[&prov, &new]);
        let list = merged["manifests"].as_array().unwrap();
        assert_eq!(list.len(), 3);
        assert_eq!(list[0], other);
        assert_eq!(list[1]["digest"], new.manifest.digest.to_string());
        assert_eq!(list[2]["digest"], prov.manifest.digest.to_string());
        // Merging again is a fixed point (a re-push writes nothing).
        assert_eq!(merge(Some(&merged), &[&new, &prov]), merged);
        assert_eq!(
            merge(None, &[&new])["manifests"].as_array().unwrap().len(),
            1
        );
    }
}
