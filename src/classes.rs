//! Class labels of a class-conditional model's samples: which class each sample is drawn for, under
//! which names the outputs file them, and classifier-free guidance.
//!
//! A sample's class is a function of the job alone ([`ClassSpec::class_of`]): the classes in ascending
//! order take their counts of consecutive sample indices. Shards, restarts and devices therefore never
//! change a label, and a job's per-class counts are exact.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::model::ModelError;
use crate::model::config::{ClassEmbedding, UNet2DConfig};
use crate::sampler::Guidance;

/// The largest guidance weight taken: far past any useful one (1–10), still finite in f32 products.
pub const MAX_GUIDANCE_SCALE: f32 = 100.0;
/// The most classes a job's counts may name, and the most names a model or a job may give.
pub const MAX_CLASSES: usize = 100_000;
/// The longest class name, in bytes.
pub const MAX_NAME_BYTES: usize = 64;

/// A class-conditional job's labels, as stored with its spec.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassSpec {
    /// Samples per class index; the classes take consecutive sample indices in ascending order.
    pub counts: BTreeMap<u32, u64>,
    /// Class names by index (the request's, else the model's); empty: each class is named by its index.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub names: Vec<String>,
    /// Classifier-free guidance, if asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guidance: Option<GuidanceSpec>,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct GuidanceSpec {
    pub scale: f32,
    pub null_class: u32,
}

impl From<GuidanceSpec> for Guidance {
    fn from(g: GuidanceSpec) -> Self {
        Guidance { scale: g.scale, null_class: i64::from(g.null_class) }
    }
}

impl ClassSpec {
    /// Samples in all.
    pub fn total(&self) -> u64 {
        self.counts.values().sum()
    }

    /// Where each class's samples start: `(first index, class)` in index order, for [`Self::class_of`].
    pub fn layout(&self) -> ClassLayout {
        let mut starts = Vec::with_capacity(self.counts.len());
        let mut next = 0u64;
        for (&class, &count) in &self.counts {
            if count > 0 {
                starts.push((next, class));
                next += count;
            }
        }
        ClassLayout { starts, end: next }
    }

    /// The class of sample `index` (`None` past the last one).
    pub fn class_of(&self, index: u64) -> Option<u32> {
        self.layout().class_of(index)
    }

    /// A class's name: its given name, else its index.
    pub fn name_of(&self, class: u32) -> String {
        self.names.get(class as usize).cloned().unwrap_or_else(|| class.to_string())
    }

    /// The classes' names for a `ClassLabel` feature: one per index up to the highest class counted.
    pub fn names_through_highest(&self) -> Vec<String> {
        let highest = self.counts.keys().next_back().copied().unwrap_or(0);
        (0..=highest.max(self.names.len().saturating_sub(1) as u32)).map(|c| self.name_of(c)).collect()
    }
}

/// [`ClassSpec`]'s sample ranges, looked up by binary search.
#[derive(Debug, Clone)]
pub struct ClassLayout {
    starts: Vec<(u64, u32)>,
    end: u64,
}

impl ClassLayout {
    pub fn class_of(&self, index: u64) -> Option<u32> {
        if index >= self.end {
            return None;
        }
        let at = self.starts.partition_point(|&(start, _)| start <= index);
        self.starts.get(at.checked_sub(1)?).map(|&(_, class)| class)
    }
}

/// `num_samples` spread over `classes` (in that order): each gets the quotient, the first ones one
/// more for the remainder.
pub fn uniform(classes: &[u32], num_samples: u64) -> BTreeMap<u32, u64> {
    let k = classes.len() as u64;
    if k == 0 {
        return BTreeMap::new();
    }
    classes
        .iter()
        .enumerate()
        .map(|(i, &c)| (c, num_samples / k + u64::from((i as u64) < num_samples % k)))
        .filter(|&(_, n)| n > 0)
        .collect()
}

/// What a job asks for, before it is checked against its model ([`resolve`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ClassRequest {
    pub counts: BTreeMap<u32, u64>,
    pub uniform: bool,
    pub guidance_scale: Option<f32>,
    pub null_class: Option<u32>,
    pub names: Vec<String>,
}

/// The class options of `submit` and `generate`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ClassArgs {
    /// CLASS=COUNT: COUNT samples of class index CLASS (repeatable; the counts add up to
    /// --num-samples) [default for a class-conditional model: every class equally].
    #[arg(long = "class", value_name = "CLASS=COUNT", value_parser = parse_class_count)]
    pub class_counts: Vec<(u32, u64)>,
    /// Classifier-free guidance weight w (ε = ε_u + w·(ε_c − ε_u)), for a model trained with a null
    /// class [default: no guidance].
    #[arg(long)]
    pub guidance_scale: Option<f32>,
    /// The model's null class [default: labels.json's null_class].
    #[arg(long)]
    pub null_class: Option<u32>,
}

impl ClassArgs {
    /// The request these options make; `None` when none was given (the model's default).
    pub fn request(&self) -> Option<ClassRequest> {
        if self.class_counts.is_empty() && self.guidance_scale.is_none() && self.null_class.is_none() {
            return None;
        }
        let mut counts = BTreeMap::new();
        for &(class, n) in &self.class_counts {
            *counts.entry(class).or_insert(0u64) += n;
        }
        Some(ClassRequest {
            uniform: counts.is_empty(),
            counts,
            guidance_scale: self.guidance_scale,
            null_class: self.null_class,
            names: Vec::new(),
        })
    }
}

fn parse_class_count(s: &str) -> Result<(u32, u64), String> {
    let (class, count) = s.split_once('=').ok_or("expected CLASS=COUNT, e.g. 3=20")?;
    let class = class.trim().parse().map_err(|e| format!("class {class:?}: {e}"))?;
    let count = count.trim().parse().map_err(|e| format!("count {count:?}: {e}"))?;
    Ok((class, count))
}

/// A job's class labels checked against its model and resolved: a uniform spread made counts (also
/// the default for a class-conditional model), the model's names and null class filled in. `None`
/// for an unconditional model. The bad fields come back by their names under `classes`
/// (`classes.counts`, …) with what is wrong with each.
pub fn resolve(
    model_name: &str,
    model: &ModelClasses,
    given: Option<&ClassRequest>,
    num_samples: u64,
) -> (Option<ClassSpec>, Vec<(&'static str, String)>) {
    let mut bad = Vec::new();
    let Some(given) = given.filter(|_| model.is_conditional()) else {
        if given.is_some() {
            bad.push(("classes", format!("model {model_name} is unconditional: it takes no class labels")));
            return (None, bad);
        }
        let spec = model.is_conditional().then(|| ClassSpec {
            counts: uniform(&model.uniform_classes(), num_samples),
            names: model.names.clone(),
            guidance: None,
        });
        return (spec, bad);
    };
    let n = model.num_classes;
    let counts = match (given.uniform, given.counts.is_empty()) {
        (true, false) => {
            bad.push(("classes.uniform", "give counts or uniform, not both".into()));
            BTreeMap::new()
        }
        (_, true) => uniform(&model.uniform_classes(), num_samples),
        (false, false) => {
            if let Some(&class) = given.counts.keys().find(|&&c| c >= n) {
                bad.push((
                    "classes.counts",
                    format!("class {class} is not one of the model's {n} classes (0..{n})"),
                ));
            }
            let total = given.counts.values().try_fold(0u64, |sum, &c| sum.checked_add(c));
            if total != Some(num_samples) {
                let total = total.map_or("more than 2^64".into(), |t| t.to_string());
                bad.push(("classes.counts", format!("add up to {total}, not num_samples = {num_samples}")));
            }
            given.counts.iter().filter(|&(_, &c)| c > 0).map(|(&k, &v)| (k, v)).collect()
        }
    };
    let names = if given.names.is_empty() { model.names.clone() } else { given.names.clone() };
    if let Err(e) = check_names(&names, n) {
        bad.push(("classes.names", e));
    }
    if let Some(null) = given.null_class
        && null >= n
    {
        bad.push(("classes.null_class", format!("{null} is not one of the model's {n} classes (0..{n})")));
    }
    let null_class = given.null_class.or(model.null_class);
    let guidance = match given.guidance_scale {
        None => None,
        Some(w) if !(w.is_finite() && (0.0..=MAX_GUIDANCE_SCALE).contains(&w)) => {
            bad.push((
                "classes.guidance_scale",
                format!("{w} must be a number from 0 to {MAX_GUIDANCE_SCALE}"),
            ));
            None
        }
        Some(scale) => match null_class {
            Some(null_class) => Some(GuidanceSpec { scale, null_class }),
            None => {
                bad.push((
                    "classes.guidance_scale",
                    format!(
                        "needs a null class (the class model {model_name} was trained with as \"no class\"): \
                         give classes.null_class, or null_class in the model's labels.json"
                    ),
                ));
                None
            }
        },
    };
    if counts.is_empty() && bad.is_empty() {
        bad.push(("classes", format!("model {model_name} has no class to spread samples over")));
    }
    (Some(ClassSpec { counts, names, guidance }), bad)
}

/// What a model says of its classes: its class embedding and, from `labels.json` in its folder, their
/// names and the null class it was trained with for classifier-free guidance.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ModelClasses {
    /// Class embeddings (`num_class_embeds`; for a `"timestep"` class embedding, the number of names);
    /// 0 for an unconditional model.
    pub num_classes: u32,
    pub names: Vec<String>,
    pub null_class: Option<u32>,
}

/// `labels.json`: `{"names": ["cat", "dog", …], "null_class": 10}` (both optional).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LabelsFile {
    #[serde(default)]
    names: Vec<String>,
    #[serde(default)]
    null_class: Option<u32>,
}

pub const LABELS_FILE: &str = "labels.json";

impl ModelClasses {
    /// Reads `labels.json` from the model folder `dir` (if there is one) and checks it against the
    /// config. A config whose labels are not class indices (`class_embed_type: "identity"`) is refused:
    /// a job cannot give it the vectors it conditions on.
    pub fn read(dir: &Path, config: &UNet2DConfig) -> Result<Self, ModelError> {
        let path = dir.join(LABELS_FILE);
        let file = match std::fs::read_to_string(&path) {
            Ok(text) => Some(
                serde_json::from_str::<LabelsFile>(&text)
                    .map_err(|e| ModelError::Config(format!("{}: {e}", path.display())))?,
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(ModelError::Io { path: path.clone(), message: e.to_string() }),
        };
        let bad = |message: String| ModelError::Config(format!("{}: {message}", path.display()));
        let num_classes = match config.class_embedding() {
            None if file.is_some() => {
                return Err(bad(
                    "the model is unconditional (no class embedding), yet has class labels".into()
                ));
            }
            None => return Ok(Self::default()),
            Some(ClassEmbedding::Identity) => {
                return Err(ModelError::Unsupported(
                    "class_embed_type = \"identity\" is not supported for sampling: it conditions on a \
                     time_embed_dim-wide vector per sample, which a job's class labels (indices) do not give"
                        .into(),
                ));
            }
            Some(ClassEmbedding::Table { classes }) => u32::try_from(classes).unwrap_or(u32::MAX),
            Some(ClassEmbedding::Timestep) => {
                // Any integer is a label; the names say how many classes there are.
                let names = file.as_ref().map_or(0, |f| f.names.len());
                let null = file.as_ref().and_then(|f| f.null_class).map_or(0, |n| n as usize + 1);
                if names.max(null) == 0 {
                    return Err(bad(
                        "class_embed_type = \"timestep\" takes any integer as a label, so labels.json must \
                         name the classes (its names give their number)"
                            .into(),
                    ));
                }
                names.max(null) as u32
            }
        };
        let Some(file) = file else {
            return Ok(Self { num_classes, names: Vec::new(), null_class: None });
        };
        check_names(&file.names, num_classes).map_err(bad)?;
        if let Some(null) = file.null_class
            && null >= num_classes
        {
            return Err(bad(format!("null_class {null} is not one of the model's {num_classes} classes")));
        }
        Ok(Self { num_classes, names: file.names, null_class: file.null_class })
    }

    pub fn is_conditional(&self) -> bool {
        self.num_classes > 0
    }

    /// The classes a uniform spread covers: those named, else every class but the null class.
    pub fn uniform_classes(&self) -> Vec<u32> {
        let n = if self.names.is_empty() { self.num_classes } else { self.names.len() as u32 };
        (0..n).filter(|&c| Some(c) != self.null_class).collect()
    }
}

/// Class names: at most one per class, each a safe folder name (1–64 bytes of letters, digits, ' ',
/// '-', '_', '.', not starting with '.'), all distinct.
pub fn check_names(names: &[String], num_classes: u32) -> Result<(), String> {
    if names.len() > num_classes as usize || names.len() > MAX_CLASSES {
        return Err(format!("{} names for {num_classes} classes", names.len()));
    }
    let mut seen = std::collections::BTreeSet::new();
    for (i, name) in names.iter().enumerate() {
        let fits = !name.is_empty()
            && name.len() <= MAX_NAME_BYTES
            && !name.starts_with('.')
            && name.chars().all(|c| c.is_alphanumeric() || matches!(c, ' ' | '-' | '_' | '.'));
        if !fits {
            return Err(format!(
                "name {i} ({:?}) must be 1 to {MAX_NAME_BYTES} bytes of letters, digits, ' ', '-', '_', '.', \
                 not starting with '.'",
                name.chars().take(80).collect::<String>()
            ));
        }
        if !seen.insert(name.as_str()) {
            return Err(format!("name {name:?} is given twice"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(counts: &[(u32, u64)]) -> ClassSpec {
        ClassSpec { counts: counts.iter().copied().collect(), names: Vec::new(), guidance: None }
    }

    #[test]
    fn classes_take_consecutive_indices_in_ascending_order() {
        let s = spec(&[(7, 2), (1, 3), (4, 0), (9, 1)]);
        let got: Vec<_> = (0..7).map(|i| s.class_of(i)).collect();
        assert_eq!(got, [Some(1), Some(1), Some(1), Some(7), Some(7), Some(9), None]);
        assert_eq!(s.total(), 6);
    }

    #[test]
    fn a_uniform_spread_is_exact_and_puts_the_remainder_first() {
        let counts = uniform(&[0, 1, 2, 3], 10);
        assert_eq!(counts.into_iter().collect::<Vec<_>>(), [(0, 3), (1, 3), (2, 2), (3, 2)]);
        // Fewer samples than classes: the first classes get one each, the others none.
        assert_eq!(uniform(&[0, 1, 2], 2).len(), 2);
    }

    #[test]
    fn requests_resolve_against_the_model_and_name_their_bad_fields() {
        let model = ModelClasses {
            num_classes: 11,
            names: (0..10).map(|d| d.to_string()).collect(),
            null_class: Some(10),
        };
        // The default: every named class equally, no guidance.
        let (spec, bad) = resolve("digits", &model, None, 25);
        let spec = spec.unwrap();
        assert!(bad.is_empty());
        assert_eq!((spec.total(), spec.counts.len(), spec.counts[&0], spec.counts[&9]), (25, 10, 3, 2));
        assert!(!spec.counts.contains_key(&10), "the null class is not a class to draw");
        // Guidance takes the model's null class.
        let asked = ClassRequest { counts: [(3, 4)].into(), guidance_scale: Some(2.0), ..Default::default() };
        let (spec, bad) = resolve("digits", &model, Some(&asked), 4);
        assert!(bad.is_empty(), "{bad:?}");
        assert_eq!(spec.unwrap().guidance, Some(GuidanceSpec { scale: 2.0, null_class: 10 }));
        // What is wrong is named.
        let fields = |req: ClassRequest, model: &ModelClasses, n: u64| -> Vec<&'static str> {
            resolve("m", model, Some(&req), n).1.into_iter().map(|(f, _)| f).collect()
        };
        assert_eq!(
            fields(ClassRequest { counts: [(11, 4)].into(), ..Default::default() }, &model, 4),
            ["classes.counts"]
        );
        assert_eq!(
            fields(ClassRequest { counts: [(1, 3)].into(), ..Default::default() }, &model, 4),
            ["classes.counts"]
        );
        let both = ClassRequest { counts: [(1, 4)].into(), uniform: true, ..Default::default() };
        assert_eq!(fields(both, &model, 4), ["classes.uniform"]);
        for w in [f32::NAN, -1.0, 101.0, f32::INFINITY] {
            let req = ClassRequest { guidance_scale: Some(w), ..Default::default() };
            assert_eq!(fields(req, &model, 4), ["classes.guidance_scale"], "{w}");
        }
        let no_null = ModelClasses { null_class: None, ..model.clone() };
        let req = ClassRequest { guidance_scale: Some(3.0), ..Default::default() };
        assert_eq!(fields(req.clone(), &no_null, 4), ["classes.guidance_scale"]);
        assert!(fields(ClassRequest { null_class: Some(0), ..req }, &no_null, 4).is_empty());
        let req = ClassRequest { null_class: Some(11), ..Default::default() };
        assert_eq!(fields(req, &model, 4), ["classes.null_class"]);
        let req = ClassRequest { names: vec!["a/b".into()], ..Default::default() };
        assert_eq!(fields(req, &model, 4), ["classes.names"]);
        // An unconditional model takes no labels.
        let (spec, bad) = resolve("m", &ModelClasses::default(), Some(&ClassRequest::default()), 4);
        assert!(spec.is_none());
        assert_eq!(bad.iter().map(|(f, _)| *f).collect::<Vec<_>>(), ["classes"]);
        assert_eq!(resolve("m", &ModelClasses::default(), None, 4), (None, vec![]));
    }

    #[test]
    fn names_are_safe_folder_names() {
        check_names(&["cat".into(), "sea lion".into(), "7".into()], 3).unwrap();
        for bad in ["", ".", "..", "a/b", "a\\b", ".hidden", "x\u{0}"] {
            assert!(check_names(&[bad.to_string()], 1).is_err(), "{bad:?}");
        }
        assert!(check_names(&["a".into(), "a".into()], 2).unwrap_err().contains("twice"));
        assert!(check_names(&["a".into(), "b".into()], 1).is_err());
    }
}
