//! Business rules, declared in a TOML file that product teams edit: what a rule can say,
//! how one is checked when the file is loaded, and which rules apply to one request.
//!
//! ```toml
//! [[rule]]
//! name = "promoted"
//! kind = "boost"
//! when = [{ attribute = "promoted", op = "eq", value = true }]
//! add = 0.2
//!
//! [[rule]]                       # the same rule, stronger for one experiment arm
//! name = "promoted"
//! variants = ["rerank_rules/strong"]
//! kind = "boost"
//! when = [{ attribute = "promoted", op = "eq", value = true }]
//! add = 0.5
//! ```
//!
//! A rule applies to a request when its `scenes` (empty: every scene) contain the
//! request's scene and its `variants` (`layer/variant`; empty: everyone) meet one of the
//! request's. Among applicable rules of one name the most specific wins (a variant rule
//! over a scene rule over a general one), so an experiment arm overrides a default by
//! naming it again, or switches it off with `enabled = false`. The kinds run in a fixed
//! order whatever the file's order (`policy.rs`): filters, then boosts / freshness /
//! exposure (in file order), then pins choose their items, diversity with caps fills the
//! other slots, and pins take their positions.

use std::collections::{HashMap, HashSet};

use serde::Deserialize;

/// The rules file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RulesFile {
    #[serde(default, rename = "rule")]
    pub rules: Vec<Rule>,
}

/// (Unknown fields are refused by `Action`, which gets every field `Rule` does not name:
/// serde cannot deny them on a struct with a flattened part.)
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Rule {
    /// Names the rule in debug traces and metrics; rules of one name override each other.
    pub name: String,
    #[serde(default)]
    pub scenes: Vec<String>,
    #[serde(default)]
    pub variants: Vec<String>,
    #[serde(default = "enabled")]
    pub enabled: bool,
    #[serde(flatten)]
    pub action: Action,
}

fn enabled() -> bool {
    true
}

/// What a rule does. Scores here are relevance normalised over the window to [0, 1]
/// (so `add = 0.1` means a tenth of the window's score range, whatever the model).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Action {
    /// Drops every item meeting all conditions.
    Filter { when: Vec<Condition> },
    /// `relevance · multiply + add` for items meeting all conditions.
    Boost {
        when: Vec<Condition>,
        #[serde(default = "one")]
        multiply: f32,
        #[serde(default)]
        add: f32,
    },
    /// The article's freshness boost: `+ weight · 0.5^(age / half_life)` for items with a
    /// known publish time.
    Freshness { half_life_days: f64, weight: f32 },
    /// Impression fatigue: an item shown to the user `max_impressions` times or more within
    /// the window is filtered (`multiply` unset) or its relevance multiplied.
    Exposure { max_impressions: u32, window_hours: f64, multiply: Option<f32> },
    /// At most `max_per_list` items per value of an attribute (multi-valued attributes
    /// such as genres count for each of their values). A strict cap is never broken (the
    /// list ends short if need be); otherwise items it refused fill a list the window
    /// cannot fill any other way, last.
    Cap {
        attribute: String,
        max_per_list: u32,
        #[serde(default)]
        strict: bool,
    },
    /// The best items meeting all conditions take these 1-based positions.
    Pin { when: Vec<Condition>, positions: Vec<u32> },
}

fn one() -> f32 {
    1.0
}

/// `attribute op value`, or `attribute op context[key]` with the request's context. An item
/// without the attribute does not meet it; a request without the context key does not
/// either, unless `context_missing = "meets"` (a compliance filter that fails closed: an
/// age-rated item is dropped for a request that does not say the user's age).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Condition {
    pub attribute: String,
    pub op: Op,
    pub value: Option<Literal>,
    pub context: Option<String>,
    #[serde(default)]
    pub context_missing: ContextMissing,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ContextMissing {
    #[default]
    Fails,
    Meets,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    /// The attribute's values (`|`-separated) include the operand.
    Has,
    /// They do not.
    Lacks,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum Literal {
    Bool(bool),
    Number(f64),
    Text(String),
}

impl Literal {
    fn text(&self) -> String {
        match self {
            Literal::Bool(value) => value.to_string(),
            Literal::Number(value) => value.to_string(),
            Literal::Text(value) => value.clone(),
        }
    }
}

impl Condition {
    /// Whether an item's attribute value meets the condition in a request's context.
    pub fn holds(&self, attribute: Option<&str>, context: &HashMap<String, String>) -> bool {
        let Some(actual) = attribute else { return false };
        let operand = match (&self.value, &self.context) {
            (Some(value), _) => value.text(),
            (None, Some(key)) => match context.get(key) {
                Some(value) => value.clone(),
                None => return self.context_missing == ContextMissing::Meets,
            },
            (None, None) => return false,
        };
        let numbers = actual.trim().parse::<f64>().ok().zip(operand.trim().parse::<f64>().ok());
        let order = match numbers {
            Some((a, b)) => a.partial_cmp(&b),
            None => Some(actual.cmp(operand.as_str())),
        };
        use std::cmp::Ordering::{Equal, Greater, Less};
        match self.op {
            Op::Eq => order == Some(Equal),
            Op::Ne => order != Some(Equal),
            Op::Lt => order == Some(Less),
            Op::Le => matches!(order, Some(Less | Equal)),
            Op::Gt => order == Some(Greater),
            Op::Ge => matches!(order, Some(Greater | Equal)),
            Op::Has => actual.split('|').any(|value| value == operand),
            Op::Lacks => !actual.split('|').any(|value| value == operand),
        }
    }
}

/// The item's windowed event counts a condition can name, `<kind>_<window>` with kind
/// impressions / clicks / likes / purchases / ctr and window 1h / 1d / 7d / 30d
/// (`clicks_1h`, `ctr_7d`): feature-svc's counters as of the request, fetched for the
/// window only when an applicable rule names one.
pub fn count_attribute(name: &str) -> Option<(CountKind, CountWindow)> {
    let (kind, window) = name.rsplit_once('_')?;
    let kind = match kind {
        "impressions" => CountKind::Impressions,
        "clicks" => CountKind::Clicks,
        "likes" => CountKind::Likes,
        "purchases" => CountKind::Purchases,
        "ctr" => CountKind::Ctr,
        _ => return None,
    };
    let window = match window {
        "1h" => CountWindow::Hour,
        "1d" => CountWindow::Day,
        "7d" => CountWindow::Week,
        "30d" => CountWindow::Month,
        _ => return None,
    };
    Some((kind, window))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CountKind {
    Impressions,
    Clicks,
    Likes,
    Purchases,
    Ctr,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CountWindow {
    Hour,
    Day,
    Week,
    Month,
}

/// Whether any of `rules` names an item count (then rerank reads the window's counts).
pub fn need_item_counts(rules: &[&Rule]) -> bool {
    rules.iter().any(|rule| {
        let when = match &rule.action {
            Action::Filter { when } | Action::Boost { when, .. } | Action::Pin { when, .. } => when.as_slice(),
            Action::Cap { attribute, .. } => return count_attribute(attribute).is_some(),
            Action::Freshness { .. } | Action::Exposure { .. } => &[],
        };
        when.iter().any(|condition| count_attribute(&condition.attribute).is_some())
    })
}

/// A rules file that passed every check: what `validate` returns and serving uses.
#[derive(Debug, Clone, Default)]
pub struct RuleSet {
    rules: Vec<Rule>,
}

impl RuleSet {
    /// Parses and checks a rules file; the error names the rule and what is wrong.
    pub fn parse(text: &str) -> Result<Self, String> {
        let file: RulesFile = toml::from_str(text).map_err(|error| error.to_string())?;
        let mut seen = HashSet::new();
        for (index, rule) in file.rules.iter().enumerate() {
            let at = format!("rule {index} ({:?})", rule.name);
            rule.check().map_err(|problem| format!("{at}: {problem}"))?;
            let mut scope = (rule.name.clone(), rule.scenes.clone(), rule.variants.clone());
            scope.1.sort();
            scope.2.sort();
            if !seen.insert(scope) {
                return Err(format!("{at}: another rule has the same name, scenes and variants"));
            }
        }
        Ok(Self { rules: file.rules })
    }

    pub fn len(&self) -> usize {
        self.rules.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The rules one request gets: per name, the most specific applicable one, if enabled.
    pub fn for_request<'a>(&'a self, scene: &str, variants: &[String]) -> Vec<&'a Rule> {
        let mut chosen: Vec<(&Rule, u8)> = Vec::new();
        for rule in &self.rules {
            let scene_ok = rule.scenes.is_empty() || rule.scenes.iter().any(|s| s == scene);
            let variant_ok = rule.variants.is_empty() || rule.variants.iter().any(|v| variants.contains(v));
            if !(scene_ok && variant_ok) {
                continue;
            }
            let specificity = 2 * u8::from(!rule.variants.is_empty()) + u8::from(!rule.scenes.is_empty());
            match chosen.iter_mut().find(|(other, _)| other.name == rule.name) {
                Some(slot) if slot.1 <= specificity => *slot = (rule, specificity),
                Some(_) => {}
                None => chosen.push((rule, specificity)),
            }
        }
        chosen.into_iter().map(|(rule, _)| rule).filter(|rule| rule.enabled).collect()
    }
}

impl Rule {
    fn check(&self) -> Result<(), String> {
        if self.name.is_empty() || self.name.len() > 64 {
            return Err("name must be 1 to 64 characters".into());
        }
        let finite = |what: &str, value: f64| {
            if value.is_finite() {
                Ok(())
            } else {
                Err(format!("{what} must be a finite number"))
            }
        };
        let conditions = |when: &[Condition]| -> Result<(), String> {
            if when.is_empty() {
                return Err("`when` needs at least one condition".into());
            }
            for condition in when {
                if condition.attribute.is_empty() {
                    return Err("a condition has an empty attribute".into());
                }
                if condition.value.is_some() == condition.context.is_some() {
                    return Err(format!(
                        "the condition on {:?} needs exactly one of `value` and `context`",
                        condition.attribute
                    ));
                }
                if condition.context.is_none() && condition.context_missing != ContextMissing::Fails {
                    return Err(format!(
                        "the condition on {:?} sets context_missing without a context",
                        condition.attribute
                    ));
                }
            }
            Ok(())
        };
        match &self.action {
            Action::Filter { when } => conditions(when),
            Action::Boost { when, multiply, add } => {
                conditions(when)?;
                finite("multiply", f64::from(*multiply))?;
                finite("add", f64::from(*add))?;
                if *multiply < 0.0 {
                    return Err("multiply must not be negative".into());
                }
                Ok(())
            }
            Action::Freshness { half_life_days, weight } => {
                finite("weight", f64::from(*weight))?;
                if !(half_life_days.is_finite() && *half_life_days > 0.0) {
                    return Err("half_life_days must be positive".into());
                }
                Ok(())
            }
            Action::Exposure { max_impressions, window_hours, multiply } => {
                if *max_impressions == 0 {
                    return Err("max_impressions must be at least 1".into());
                }
                if !(window_hours.is_finite() && *window_hours > 0.0) {
                    return Err("window_hours must be positive".into());
                }
                if let Some(multiply) = multiply {
                    finite("multiply", f64::from(*multiply))?;
                    if !(0.0..=1.0).contains(multiply) {
                        return Err("an exposure multiply must be in [0, 1] (a demotion)".into());
                    }
                }
                Ok(())
            }
            Action::Cap { attribute, max_per_list, .. } => {
                if attribute.is_empty() {
                    return Err("attribute is empty".into());
                }
                if *max_per_list == 0 {
                    return Err("max_per_list must be at least 1 (use a filter to drop items)".into());
                }
                Ok(())
            }
            Action::Pin { when, positions } => {
                conditions(when)?;
                if positions.is_empty() || positions.contains(&0) {
                    return Err("positions must be 1-based and not empty".into());
                }
                if positions.iter().collect::<HashSet<_>>().len() != positions.len() {
                    return Err("positions repeat".into());
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"
        [[rule]]
        name = "promoted"
        kind = "boost"
        when = [{ attribute = "promoted", op = "eq", value = true }]
        add = 0.2

        [[rule]]
        name = "promoted"
        variants = ["rules/strong"]
        kind = "boost"
        when = [{ attribute = "promoted", op = "eq", value = true }]
        add = 0.5

        [[rule]]
        name = "promoted"
        variants = ["rules/off"]
        enabled = false
        kind = "boost"
        when = [{ attribute = "promoted", op = "eq", value = true }]

        [[rule]]
        name = "genre_cap"
        scenes = ["home"]
        kind = "cap"
        attribute = "category"
        max_per_list = 3
    "#;

    fn boost_of(rules: &[&Rule]) -> Option<f32> {
        rules.iter().find_map(|rule| match rule.action {
            Action::Boost { add, .. } => Some(add),
            _ => None,
        })
    }

    #[test]
    fn the_most_specific_rule_of_a_name_applies() {
        let rules = RuleSet::parse(FILE).unwrap();
        assert_eq!(rules.len(), 4);
        let default = rules.for_request("", &[]);
        assert_eq!(boost_of(&default), Some(0.2));
        assert!(default.iter().all(|rule| rule.name != "genre_cap"), "scoped to home");
        let strong = rules.for_request("home", &["rules/strong".to_string()]);
        assert_eq!(boost_of(&strong), Some(0.5));
        assert!(strong.iter().any(|rule| rule.name == "genre_cap"));
        assert_eq!(boost_of(&rules.for_request("", &["rules/off".to_string()])), None, "switched off");
    }

    #[test]
    fn a_bad_file_is_rejected_with_the_rule_and_the_problem() {
        let cases = [
            ("[[rule]]\nname = \"x\"\nkind = \"shuffle\"", "unknown variant"),
            ("[[rule]]\nname = \"x\"\nkind = \"cap\"\nattribute = \"seller\"\nmax_per_list = 0", "max_per_list"),
            ("[[rule]]\nname = \"x\"\nkind = \"freshness\"\nhalf_life_days = -1\nweight = 0.1", "half_life_days"),
            ("[[rule]]\nname = \"x\"\nkind = \"pin\"\nwhen = [{ attribute = \"promoted\", op = \"eq\", value = true }]\npositions = [0]", "1-based"),
            ("[[rule]]\nname = \"x\"\nkind = \"filter\"\nwhen = [{ attribute = \"stock\", op = \"le\" }]", "exactly one of"),
            ("[[rule]]\nname = \"x\"\nkind = \"filter\"\nwhen = []", "at least one condition"),
            ("[[rule]]\nname = \"x\"\nkind = \"cap\"\nattribute = \"seller\"\nmax_per_list = 2\ncolour = 1", "unknown field"),
        ];
        for (text, expected) in cases {
            let error = RuleSet::parse(text).unwrap_err();
            assert!(error.contains(expected), "{text:?}: {error}");
        }
        let twice = "[[rule]]\nname = \"x\"\nkind = \"cap\"\nattribute = \"a\"\nmax_per_list = 2\n".repeat(2);
        assert!(RuleSet::parse(&twice).unwrap_err().contains("same name"));
    }

    #[test]
    fn item_counts_are_fetched_only_when_a_rule_names_one() {
        assert_eq!(count_attribute("clicks_1h"), Some((CountKind::Clicks, CountWindow::Hour)));
        assert_eq!(count_attribute("ctr_30d"), Some((CountKind::Ctr, CountWindow::Month)));
        assert_eq!(count_attribute("clicks_2h"), None);
        assert_eq!(count_attribute("seller"), None);
        let trending = RuleSet::parse(
            "[[rule]]\nname = \"t\"\nkind = \"boost\"\nwhen = [{ attribute = \"clicks_1h\", op = \"ge\", value = 5 }]\nadd = 0.1",
        )
        .unwrap();
        assert!(need_item_counts(&trending.for_request("", &[])));
        assert!(!need_item_counts(&RuleSet::parse(FILE).unwrap().for_request("", &[])));
    }

    #[test]
    fn the_shipped_rules_file_passes_the_checks() {
        let shipped = include_str!("../../../deploy/rerank/rules.toml");
        let rules = RuleSet::parse(shipped).unwrap();
        assert!(rules.len() >= 6, "every kind has an example");
    }

    #[test]
    fn conditions_compare_numbers_as_numbers_and_lists_by_membership() {
        let condition = |op, value: Option<Literal>, context: Option<&str>| Condition {
            attribute: "a".into(),
            op,
            value,
            context: context.map(String::from),
            context_missing: ContextMissing::Fails,
        };
        let context = HashMap::from([("user_age".to_string(), "16".to_string())]);
        let older_than_user = condition(Op::Gt, None, Some("user_age"));
        assert!(older_than_user.holds(Some("18"), &context));
        assert!(!older_than_user.holds(Some("9"), &context), "9 < 16 as numbers, not as text");
        assert!(!older_than_user.holds(None, &context), "no attribute: not met");
        assert!(!condition(Op::Gt, None, Some("region")).holds(Some("18"), &context), "no context: not met");
        let closed = Condition { context_missing: ContextMissing::Meets, ..condition(Op::Gt, None, Some("region")) };
        assert!(closed.holds(Some("18"), &context), "fails closed without the context");
        assert!(!closed.holds(None, &context), "but an item without the attribute is not restricted");
        let has = condition(Op::Has, Some(Literal::Text("US".into())), None);
        assert!(has.holds(Some("CA|US"), &context));
        assert!(!has.holds(Some("USA"), &context));
        assert!(condition(Op::Eq, Some(Literal::Bool(true)), None).holds(Some("true"), &context));
    }
}

/// The rules serving uses, reloaded from their file when it changes. A file that fails
/// the checks is refused (logged, counted) and the rules before it keep serving.
#[derive(Debug)]
pub struct LiveRules {
    path: Option<std::path::PathBuf>,
    current: std::sync::RwLock<(std::sync::Arc<RuleSet>, String)>,
}

static RELOADS: std::sync::LazyLock<prometheus::IntCounterVec> = std::sync::LazyLock::new(|| {
    prometheus::register_int_counter_vec!(
        "recsys_rerank_rules_reloads_total",
        "Rules file reloads by result (loaded, rejected)",
        &["result"]
    )
    .expect("metric registers once")
});

impl LiveRules {
    /// Loads the file (none: no rules). At start a bad file is an error: nothing serves yet.
    pub fn open(path: Option<&std::path::Path>) -> Result<Self, String> {
        let (rules, text) = match path {
            None => (RuleSet::default(), String::new()),
            Some(path) => {
                let text = read(path)?;
                let rules = RuleSet::parse(&text).map_err(|error| format!("rules file {}: {error}", path.display()))?;
                (rules, text)
            }
        };
        Ok(Self { path: path.map(std::path::Path::to_path_buf), current: std::sync::RwLock::new((rules.into(), text)) })
    }

    pub fn current(&self) -> std::sync::Arc<RuleSet> {
        std::sync::Arc::clone(&self.current.read().expect("rules lock").0)
    }

    /// Reloads the file if its content changed: `Ok(true)` when new rules serve, `Err`
    /// (the old rules keep serving) when the new file is refused.
    pub fn reload(&self) -> Result<bool, String> {
        let Some(path) = &self.path else { return Ok(false) };
        let text = read(path)?;
        if self.current.read().expect("rules lock").1 == text {
            return Ok(false);
        }
        match RuleSet::parse(&text) {
            Ok(rules) => {
                tracing::info!(file = %path.display(), rules = rules.len(), "rules reloaded");
                *self.current.write().expect("rules lock") = (rules.into(), text);
                RELOADS.with_label_values(&["loaded"]).inc();
                Ok(true)
            }
            Err(error) => {
                RELOADS.with_label_values(&["rejected"]).inc();
                Err(format!("rules file {} refused, the previous rules keep serving: {error}", path.display()))
            }
        }
    }

    /// Checks the file every `every` until the process ends.
    pub fn watch(self: std::sync::Arc<Self>, every: std::time::Duration) {
        if self.path.is_none() || every.is_zero() {
            return;
        }
        tokio::spawn(async move {
            // A refused file is logged once, not at every check.
            let mut refused = String::new();
            loop {
                tokio::time::sleep(every).await;
                match self.reload() {
                    Ok(_) => refused.clear(),
                    Err(error) if error != refused => {
                        tracing::error!(%error, "rules not reloaded");
                        refused = error;
                    }
                    Err(_) => {}
                }
            }
        });
    }
}

fn read(path: &std::path::Path) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|error| format!("rules file {}: {error}", path.display()))
}

#[cfg(test)]
mod reload_tests {
    use super::*;

    #[test]
    fn a_refused_file_leaves_the_previous_rules_serving() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rules.toml");
        let cap = |max: u32| {
            format!("[[rule]]\nname = \"cap\"\nkind = \"cap\"\nattribute = \"category\"\nmax_per_list = {max}\n")
        };
        std::fs::write(&path, cap(2)).unwrap();
        let rules = LiveRules::open(Some(&path)).unwrap();
        assert_eq!(rules.reload(), Ok(false), "unchanged");
        std::fs::write(&path, cap(0)).unwrap();
        let refused = rules.reload().unwrap_err();
        assert!(refused.contains("max_per_list") && refused.contains("previous rules keep serving"), "{refused}");
        assert_eq!(
            rules.current().for_request("", &[])[0].action,
            Action::Cap { attribute: "category".into(), max_per_list: 2, strict: false }
        );
        std::fs::write(&path, cap(3)).unwrap();
        assert_eq!(rules.reload(), Ok(true));
        assert_eq!(
            rules.current().for_request("", &[])[0].action,
            Action::Cap { attribute: "category".into(), max_per_list: 3, strict: false }
        );
        assert!(LiveRules::open(Some(&dir.path().join("missing.toml"))).unwrap_err().contains("missing.toml"));
    }
}
