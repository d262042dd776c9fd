"""verdicts.py -- a claim's verdict from per-seed numbers, by one rule
(docs/claims.md, "The verdict rule").

A comparison asks whether variant A beats variant B on one measure (C1: pre-trained vs from
scratch, accuracy; C5: no remedy vs a remedy, forgetting) by more than the claim's margin.
Both were run on the same seeds -- the same draws of labeled examples, the same initial
shuffles -- so the comparison is PAIRED: per seed s, d_s = a_s - b_s, and the seeds differ in
the draw, not in which variant got the luckier one.

    mean   d_bar = (1/n) sum_s d_s
    spread s_d   = sqrt( sum_s (d_s - d_bar)^2 / (n - 1) )      the SAMPLE std (ddof = 1)
    95%    d_bar -/+ t_{0.975, n-1} * s_d / sqrt(n)             Student's t interval

    holds           the whole interval lies above the margin           (low  > margin)
    does not hold   the whole interval lies below the margin           (high < margin)
    not settled     the interval touches or straddles it; or one seed (no interval)

A margin of 0 asks "better"; a negative margin asks "as good as, within |margin|" (C3: head
only within 2 points of full fine-tuning). Over several settings (corpora, label counts,
remedies) the verdicts combine into one line: the same verdict everywhere is that verdict,
different ones read "mixed: holds for ...; not for ...; not settled for ..." -- or, group by group
(a plan's corpus), "mixed. quick toy: holds. real-text text: holds for k=4; not for k=all.".
No setting measured: "not tested".
"""

import math

# t_{0.975, df}: the two-sided 95% quantile of Student's t, for df = 1..30 (standard tables)
T_975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
         2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
         2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]

HOLDS, DOES_NOT_HOLD = "holds", "does not hold"
NOT_SETTLED, NOT_TESTED = "not settled", "not tested"


def t_quantile(df):
    """t_{0.975, df}; past the table, the normal quantile z with the first two terms of the
    Cornish-Fisher expansion, z + (z^3 + z) / (4 df) + (5 z^5 + 16 z^3 + 3 z) / (96 df^2),
    within 0.001 of the exact value there."""
    if df < 1:
        raise ValueError(f"a t interval needs at least 1 degree of freedom, got {df}")
    if df <= len(T_975):
        return T_975[df - 1]
    z = 1.959964
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


def sample_std(values):
    """sqrt(sum (v - mean)^2 / (n - 1)): the sample std (ddof = 1); None for fewer than 2
    values."""
    if len(values) < 2:
        return None
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def paired_differences(a, b):
    """{seed: value} twice -> [a_s - b_s] over the seeds both have, in seed order."""
    return [a[seed] - b[seed] for seed in sorted(set(a) & set(b))]


def compare(a, b, margin=0.0):
    """The verdict on "A beats B by more than margin", from {seed: value} of each (paired by
    seed). Returns {"verdict", "difference" (mean d), "interval" ([low, high], None for one
    seed), "n", "margin", "differences"}."""
    differences = paired_differences(a, b)
    n = len(differences)
    if n == 0:
        return {"verdict": NOT_TESTED, "difference": None, "interval": None, "n": 0,
                "margin": margin, "differences": []}
    mean = sum(differences) / n
    spread = sample_std(differences)
    if spread is None:  # one seed: a difference, but nothing says how much it would move
        return {"verdict": NOT_SETTLED, "difference": mean, "interval": None, "n": 1,
                "margin": margin, "differences": differences}
    half_width = t_quantile(n - 1) * spread / math.sqrt(n)
    low, high = mean - half_width, mean + half_width
    verdict = HOLDS if low > margin else DOES_NOT_HOLD if high < margin else NOT_SETTLED
    return {"verdict": verdict, "difference": mean, "interval": [low, high], "n": n,
            "margin": margin, "differences": differences}


def shared_prefix_dropped(settings):
    """['toy k=4', 'toy k=16', 'text k=4'] -> ['toy k=4', 'k=16', 'text k=4']: a setting's
    first word is left out when the setting before it starts with the same word (the line
    stays readable)."""
    shortened = []
    for before, setting in zip([None, *settings], settings):
        first, _, rest = setting.partition(" ")
        same_first_word = before is not None and rest and before.partition(" ")[0] == first
        shortened.append(rest if same_first_word else setting)
    return shortened


def combine(verdicts):
    """[(setting, verdict)] -> one line. The same verdict everywhere: that verdict; otherwise
    "mixed: holds for X, Y; not for Z; not settled for W" (listing: settings in the order given,
    each once per verdict; a setting's first word is said once for a run of settings that share
    it, "toy k=4, k=16"; a verdict with many settings counted)."""
    # a setting with several comparisons of one verdict is named once (the rows keep each one)
    verdicts = [(setting, verdict) for setting, verdict in dict.fromkeys(verdicts)
                if verdict != NOT_TESTED]
    if not verdicts:
        return NOT_TESTED
    kinds = {verdict for _, verdict in verdicts}
    if len(kinds) == 1:
        return kinds.pop()
    return "mixed: " + listing(verdicts)


# a mixed line names at most this many settings of one verdict among more than MANY; past
# that it counts them ("holds for 11 of 18 settings"): every row stays in results/claims.json
FEW, MANY = 5, 8


def listing(verdicts):
    """[(setting, verdict)] (measured, each once) -> "holds for X, Y; not for Z; not settled for
    W"; a verdict with more than FEW settings among more than MANY is counted, not named."""
    parts = []
    wordings = ((HOLDS, "holds for"), (DOES_NOT_HOLD, "not for"), (NOT_SETTLED, "not settled for"))
    for kind, words in wordings:
        settings = [setting for setting, verdict in verdicts if verdict == kind]
        if len(settings) > FEW and len(verdicts) > MANY:
            parts.append(f"{words} {len(settings)} of {len(verdicts)} settings")
        elif settings:
            parts.append(f"{words} {', '.join(shared_prefix_dropped(settings))}")
    return "; ".join(parts)


def combine_groups(verdicts):
    """[(group, setting, verdict)] -> one line, group by group (a group: a plan's corpus, e.g.
    "quick toy"). The same verdict everywhere: that verdict; otherwise "mixed. G1: holds. G2:
    holds for k=4; not settled for k=all." -- each group's own verdict, or its listing with the
    group's words left out of its settings."""
    measured = [(group, setting, verdict) for group, setting, verdict
                in dict.fromkeys(verdicts) if verdict != NOT_TESTED]
    overall = combine([(f"{group} {setting}", verdict) for group, setting, verdict in measured])
    if not overall.startswith("mixed"):
        return overall
    groups = {}
    for group, setting, verdict in measured:
        groups.setdefault(group, []).append((setting, verdict))
    parts = []
    for group, items in groups.items():
        kinds = {verdict for _, verdict in items}
        parts.append(f"{group}: {kinds.pop() if len(kinds) == 1 else listing(items)}.")
    return "mixed. " + " ".join(parts)


if __name__ == "__main__":
    # the rule on three made-up comparisons of 5 seeds each
    clear = compare({s: 0.9 + 0.01 * s for s in range(5)}, {s: 0.5 + 0.02 * s for s in range(5)})
    close = compare({s: 0.5 + 0.03 * (-1) ** s for s in range(5)}, {s: 0.5 for s in range(5)})
    worse = compare({s: 0.4 for s in range(5)}, {s: 0.6 + 0.01 * s for s in range(5)})
    for name, result in (("clear win", clear), ("close", close), ("clear loss", worse)):
        low, high = result["interval"]
        print(f"{name}: d = {result['difference']:+.3f}, "
              f"95% [{low:+.3f}, {high:+.3f}] -> {result['verdict']}")
    print(combine([("toy", clear["verdict"]), ("real text", close["verdict"]),
                   ("other", worse["verdict"])]))
    assert (clear["verdict"], close["verdict"], worse["verdict"]) == (
        "holds", "not settled", "does not hold")
    print("self-check passed")
