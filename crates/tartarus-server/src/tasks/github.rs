//! Pull requests on GitHub (or GitHub Enterprise) through its REST API with octocrab: `POST
//! /repos/{owner}/{repo}/pulls` (GitHub's "Create a pull request": `title`, `head`, `base`, `body`;
//! answered 201 with the pull request, of which `number` and `html_url` are read). The base URL is
//! configurable; tests use a double on loopback written from GitHub's published description (docs/tasks.md).

use std::time::Duration;

/// Where pull requests are opened, and as whom.
#[derive(Clone)]
pub struct GithubSettings {
    /// `https://api.github.com`, or GitHub Enterprise's `https://HOST/api/v3`.
    pub api_url: String,
    pub token: String,
}

/// Never shows the token.
impl std::fmt::Debug for GithubSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GithubSettings")
            .field("api_url", &self.api_url)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum GithubError {
    #[error("the GitHub client could not be built")]
    Client(#[source] octocrab::Error),
    #[error("GitHub refused to open the pull request")]
    Refused(#[source] octocrab::Error),
    #[error("GitHub did not answer within {0:?}")]
    Timeout(Duration),
}

/// The fields of GitHub's answer used here.
#[derive(Debug, serde::Deserialize)]
pub struct PullRequest {
    pub number: u64,
    pub html_url: String,
}

/// The longest wait for GitHub.
const TIMEOUT: Duration = Duration::from_secs(30);

/// Opens a pull request of `head` into `base` on `repo` (`OWNER/NAME`).
pub async fn open_pull_request(
    settings: &GithubSettings,
    repo: &str,
    head: &str,
    base: &str,
    title: &str,
    body: &str,
) -> Result<PullRequest, GithubError> {
    let client = octocrab::Octocrab::builder()
        .base_uri(settings.api_url.as_str())
        .map_err(GithubError::Client)?
        .personal_token(settings.token.clone())
        .set_connect_timeout(Some(Duration::from_secs(10)))
        .set_read_timeout(Some(TIMEOUT))
        .build()
        .map_err(GithubError::Client)?;
    let request = serde_json::json!({ "title": title, "head": head, "base": base, "body": body });
    let create = client.post::<_, PullRequest>(format!("/repos/{repo}/pulls"), Some(&request));
    match tokio::time::timeout(TIMEOUT, create).await {
        Ok(result) => result.map_err(GithubError::Refused),
        Err(_) => Err(GithubError::Timeout(TIMEOUT)),
    }
}
