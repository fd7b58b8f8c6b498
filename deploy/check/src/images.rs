//! Image references: `[registry/]name[:tag][@digest]`, and what counts as pinned.

/// A parsed image reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef<'a> {
    /// Everything before the tag (registry and path included).
    pub name: &'a str,
    /// The tag, if any.
    pub tag: Option<&'a str>,
    /// Whether a digest (`@sha256:…`) pins the content.
    pub digest: bool,
}

impl<'a> ImageRef<'a> {
    /// Splits a reference (a `:` after the last `/` starts the tag; a registry port does not).
    pub fn parse(image: &'a str) -> Self {
        let (rest, digest) = match image.split_once('@') {
            Some((n, _)) => (n, true),
            None => (image, false),
        };
        let slash = rest.rfind('/').map_or(0, |i| i + 1);
        match rest[slash..].split_once(':') {
            Some((_, tag)) => {
                Self { name: &rest[..rest.len() - tag.len() - 1], tag: Some(tag), digest }
            }
            None => Self { name: rest, tag: None, digest },
        }
    }

    /// No digest, and no tag or `latest`: the content changes under the same reference.
    pub fn floats(&self) -> bool {
        !self.digest && matches!(self.tag, None | Some("latest"))
    }

    /// A digest, or a tag naming an exact `X.Y.Z` version.
    pub fn pinned(&self) -> bool {
        self.digest || self.tag.is_some_and(has_exact_version)
    }

    /// The last path segment of the name (`nvidia/cuda` → `cuda`, `debian` → `debian`).
    pub fn short_name(&self) -> &'a str {
        self.name.rsplit('/').next().unwrap_or(self.name)
    }
}

fn numeric_run(part: &str, min: usize) -> bool {
    let part = part.strip_prefix('v').unwrap_or(part);
    let nums: Vec<&str> = part.split('.').collect();
    nums.len() >= min && nums.iter().all(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// Whether a tag holds an exact `X.Y.Z` version (`0.1.0`, `7.4.2-bookworm`, `v1.2.3`).
pub fn has_exact_version(tag: &str) -> bool {
    tag.split(['-', '_', '+']).any(|part| numeric_run(part, 3))
}

/// Whether a tag holds an `X.Y` version: the way Debian (`12.12`) and Ubuntu (`24.04`) name
/// their point releases.
pub fn has_point_release(tag: &str) -> bool {
    tag.split(['-', '_', '+']).any(|part| numeric_run(part, 2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_and_pins() {
        assert_eq!(
            ImageRef::parse("registry:5000/dsvl/cpu"),
            ImageRef { name: "registry:5000/dsvl/cpu", tag: None, digest: false }
        );
        let r = ImageRef::parse("dsvl/cpu:0.1.0@sha256:ab");
        assert_eq!((r.name, r.tag, r.digest), ("dsvl/cpu", Some("0.1.0"), true));
        assert!(ImageRef::parse("redis:latest").floats() && ImageRef::parse("redis").floats());
        assert!(
            ImageRef::parse("redis:7.4.2-bookworm").pinned()
                && !ImageRef::parse("rust:1.95-bookworm").pinned()
        );
        assert!(has_point_release("12.12-slim") && !has_point_release("bookworm-slim"));
        assert_eq!(ImageRef::parse("nvidia/cuda:13.0.2-runtime-ubuntu24.04").short_name(), "cuda");
    }
}
