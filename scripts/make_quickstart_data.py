"""Generate jaxft's small offline quickstart sentiment data set.

Writes data/quickstart/train.tsv and data/quickstart/validation.tsv (header
``text<TAB>label``, labels ``positive``/``negative``, balanced). Every sentence
is composed here from templates and word lists for three domains (movies,
products, restaurants); nothing is taken from any external corpus.

To keep the task from being solvable by spotting the template, every template
produces both labels, and many carry the sentiment through negation ("not bad
at all"), concession ("the pacing drags a little, but ...") or comparison, so a
bag-of-words model does well but not perfectly. Output is deterministic for a
given --seed; sentences are unique (case- and punctuation-insensitive) across
both files, so train and validation never overlap. Text never contains tabs
or quote characters (no contractions either).

    .venv/bin/python scripts/make_quickstart_data.py            # default sizes
    .venv/bin/python scripts/make_quickstart_data.py --stats    # also print template stats
"""

import argparse
import collections
import random
import re
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
POS, NEG = "positive", "negative"

# Nouns marked "|p" are plural. Aspects map to (positive, negative) adjectives.
DOMAINS = {
    "movie": dict(
        subjects=["the film", "this movie", "the sequel", "the documentary", "the new thriller",
                  "this romantic comedy", "the animated feature", "the remake", "the horror film",
                  "this indie drama", "the space adventure", "the biopic", "the mystery", "this musical"],
        aspects={
            "the acting": (["superb", "convincing", "natural", "terrific"], ["wooden", "stiff", "over the top", "flat"]),
            "the script": (["sharp", "witty", "clever", "smart"], ["clumsy", "lazy", "full of cliches", "thin"]),
            "the soundtrack": (["gorgeous", "memorable", "perfect", "lovely"], ["intrusive", "forgettable", "grating", "overbearing"]),
            "the ending": (["satisfying", "perfect", "brave", "earned"], ["rushed", "ridiculous", "unearned", "confusing"]),
            "the pacing": (["brisk", "tight", "well judged", "confident"], ["sluggish", "uneven", "glacial", "off"]),
            "the dialogue": (["witty", "natural", "sharp", "funny"], ["stilted", "cheesy", "clunky", "awkward"]),
            "the camera work": (["stunning", "gorgeous", "beautiful", "inventive"], ["murky", "flat", "shaky", "dull"]),
            "the lead actors|p": (["wonderful", "charming", "convincing", "great together"], ["miscast", "wooden", "unconvincing", "lost"]),
            "the effects|p": (["seamless", "stunning", "impressive", "clever"], ["cheap", "distracting", "dated", "cartoonish"]),
        },
        pos_adj=["wonderful", "moving", "gripping", "hilarious", "beautifully shot", "smart", "heartfelt",
                 "tense", "clever", "charming", "a real treat", "excellent", "fun", "good", "great", "memorable"],
        neg_adj=["boring", "dull", "predictable", "clumsy", "overlong", "tedious", "pretentious", "confusing",
                 "lifeless", "a mess", "a letdown", "awful", "bad", "forgettable", "disappointing", "silly"],
        negatable_pos=["good", "funny", "original", "exciting", "memorable", "well written", "scary", "clever"],
        negatable_neg=["bad", "boring", "dull", "predictable", "a waste of time", "disappointing", "slow"],
        pos_vp=["kept me hooked from start to finish", "made me laugh out loud more than once",
                "stayed with me for days afterward", "won me over completely", "had me in tears by the end",
                "held my attention the whole way through", "surprised me in the best way",
                "left the whole theater cheering"],
        neg_vp=["dragged on far too long", "nearly put me to sleep", "fell apart in the final act",
                "wasted a very talented cast", "never found its rhythm", "lost me within the first twenty minutes",
                "felt twice as long as it was", "left me checking my watch"],
        pos_notvp=["did not waste a single minute", "never lost my attention", "did not disappoint",
                   "never once felt slow", "did not take the easy way out"],
        neg_notvp=["did not live up to the hype", "never made me care about anyone on screen",
                   "did not earn its ending", "did not make me laugh once", "never really got going"],
        pos_feel=["I loved", "I really enjoyed", "I was impressed by", "I was pleasantly surprised by",
                  "I am so glad I watched", "I fell for", "my whole family enjoyed"],
        neg_feel=["I hated", "I was bored by", "I was let down by", "I could not stand", "I wish I had skipped",
                  "I walked out of", "I regret paying to see"],
        try_verb=["watch", "see", "catch"],
        refs=["the reviews suggested", "the first one", "I expected", "the trailer made it look", "I remembered"],
        context=["I saw it on a rainy Sunday afternoon.", "I went in knowing nothing about it.",
                 "We watched it at home last weekend.", "I caught a late showing with friends.",
                 "My sister picked it for movie night."],
        pos_close=["Go see it.", "I would watch it again tomorrow.", "One of the best I have seen this year."],
        neg_close=["Skip it.", "Two hours I will never get back.", "I nearly left halfway through."],
    ),
    "product": dict(
        subjects=["this blender", "the vacuum", "these headphones|p", "the phone case", "this coffee maker",
                  "the backpack", "the new laptop", "this kettle", "the desk lamp", "these running shoes|p",
                  "this air fryer", "the keyboard", "the office chair", "this electric toothbrush",
                  "the rice cooker", "these kitchen knives|p"],
        aspects={
            "the battery life": (["excellent", "impressive", "fantastic", "more than enough"], ["terrible", "short", "pathetic", "poor"]),
            "the build quality": (["solid", "excellent", "premium", "great"], ["cheap", "flimsy", "poor", "shoddy"]),
            "customer support": (["helpful", "quick", "friendly", "excellent"], ["useless", "slow", "unhelpful", "rude"]),
            "the instructions|p": (["clear", "simple", "easy to follow", "helpful"], ["confusing", "useless", "hard to follow", "vague"]),
            "the price": (["fair", "reasonable", "a steal", "hard to beat"], ["ridiculous", "too high", "hard to justify", "steep"]),
            "the design": (["sleek", "clever", "thoughtful", "elegant"], ["awkward", "clumsy", "ugly", "annoying"]),
            "the materials|p": (["sturdy", "high quality", "durable", "solid"], ["cheap", "thin", "flimsy", "brittle"]),
            "the setup": (["quick", "painless", "easy", "simple"], ["confusing", "a nightmare", "tedious", "frustrating"]),
        },
        pos_adj=["sturdy", "reliable", "quiet", "comfortable", "well made", "easy to use", "powerful", "durable",
                 "excellent", "a great buy", "worth every penny", "fantastic", "great", "good", "solid", "handy"],
        neg_adj=["flimsy", "noisy", "cheap", "unreliable", "uncomfortable", "fragile", "overpriced", "useless",
                 "clunky", "a waste of money", "junk", "terrible", "bad", "disappointing", "awkward", "poorly made"],
        negatable_pos=["good", "sturdy", "reliable", "comfortable", "well made", "easy to use", "quiet", "durable"],
        negatable_neg=["bad", "flimsy", "noisy", "disappointing", "hard to use", "cheap", "overpriced"],
        pos_vp=["worked perfectly right out of the box", "held up well after months of daily use",
                "made my mornings much easier", "did exactly what the listing promised", "arrived early and worked great",
                "paid for itself within a month", "impressed everyone in the house",
                "survived a fall off the counter without a scratch"],
        neg_vp=["stopped working after a week", "broke on the second use", "arrived scratched and missing parts",
                "started making a grinding noise within days", "died after barely a month", "fell apart almost immediately",
                "overheated constantly", "needed constant fiddling just to work"],
        pos_notvp=["did not let me down once", "never gave me any trouble", "never missed a beat",
                   "did not disappoint", "has not needed a single repair"],
        neg_notvp=["did not work as advertised", "never worked properly", "did not last a month",
                   "did not come close to the description", "never felt worth the money"],
        pos_feel=["I love", "I am really happy with", "I was impressed by", "I was pleasantly surprised by",
                  "I am so glad I bought", "my partner loves", "I have zero regrets about"],
        neg_feel=["I hate", "I regret buying", "I was let down by", "I am disappointed with", "I wish I had never ordered",
                  "I am returning", "I am fed up with"],
        try_verb=["buy", "get", "order"],
        refs=["my old one", "the pricier brands", "I expected", "the reviews suggested", "the photos made it look"],
        context=["I ordered it on a whim.", "I have used it daily for about a month.", "It was a birthday gift.",
                 "I bought it to replace an older model.", "It arrived on Tuesday."],
        pos_close=["Would buy again.", "Five stars from me.", "No complaints at all."],
        neg_close=["Sent it back.", "Save your money.", "One star is generous."],
    ),
    "restaurant": dict(
        subjects=["the restaurant", "this place", "the new bistro downtown", "the taco truck by the station",
                  "the noodle shop", "the bakery on the corner", "this little cafe", "the steakhouse",
                  "the sushi bar", "the pizzeria", "the diner near my office", "the Thai place on Main Street"],
        aspects={
            "the service": (["attentive", "friendly", "quick", "warm"], ["slow", "rude", "careless", "inattentive"]),
            "the food": (["delicious", "fresh", "flavorful", "perfectly cooked"], ["bland", "greasy", "cold", "overcooked"]),
            "the portions|p": (["generous", "huge", "just right", "filling"], ["tiny", "stingy", "sad", "small"]),
            "the dessert": (["heavenly", "delicious", "lovely", "rich"], ["stale", "too sweet", "forgettable", "dry"]),
            "the atmosphere": (["cozy", "relaxed", "lively", "charming"], ["loud", "cramped", "gloomy", "chaotic"]),
            "the coffee": (["excellent", "rich", "strong", "smooth"], ["burnt", "watery", "bitter", "lukewarm"]),
            "the staff|p": (["friendly", "welcoming", "helpful", "lovely"], ["rude", "dismissive", "clueless", "unfriendly"]),
            "the wait": (["short", "reasonable", "barely noticeable", "quick"], ["endless", "ridiculous", "way too long", "painful"]),
        },
        pos_adj=["wonderful", "a real gem", "fantastic", "excellent", "charming", "a delight", "worth every penny",
                 "cozy and welcoming", "great", "good", "lovely", "spotless", "a great find", "delicious"],
        neg_adj=["disappointing", "overpriced", "a letdown", "dirty", "awful", "a total mess", "forgettable",
                 "chaotic", "bad", "terrible", "mediocre", "greasy", "a tourist trap", "sloppy"],
        negatable_pos=["good", "fresh", "friendly", "tasty", "worth the price", "clean", "welcoming"],
        negatable_neg=["bad", "bland", "overpriced", "disappointing", "greasy", "crowded", "slow"],
        pos_vp=["hit the spot after a long day", "exceeded every expectation", "made our anniversary dinner special",
                "won over even my picky kids", "treated us like regulars on our first visit", "got every detail right",
                "served the best soup I have had in years", "made us feel right at home"],
        neg_vp=["kept us waiting almost an hour for a table", "got half of our order wrong",
                "charged us for dishes we never received", "served us lukewarm food",
                "ruined what should have been a nice evening", "left us hungry and annoyed",
                "forgot our drinks twice", "gave my friend food poisoning"],
        pos_notvp=["did not disappoint", "never rushed us", "did not miss a single detail",
                   "never lets the quality slip", "did not make us wait long"],
        neg_notvp=["did not live up to the hype", "never brought the bread we asked for",
                   "did not even apologize for the mix-up", "never checked on our table", "did not honor our reservation"],
        pos_feel=["I loved", "we really enjoyed", "I was impressed by", "I was pleasantly surprised by",
                  "I am so glad we tried", "my parents adored", "we keep going back to"],
        neg_feel=["I hated", "we regret choosing", "I was let down by", "we were disappointed by",
                  "I wish we had skipped", "we walked out of", "I will not be going back to"],
        try_verb=["try", "visit", "check out"],
        refs=["the reviews suggested", "I remembered", "the place next door", "I expected", "the photos made it look"],
        context=["We went for a late lunch.", "We had a reservation for six.", "I came here with coworkers.",
                 "We stopped by on a Friday night.", "It was my first visit."],
        pos_close=["We will be back.", "Highly recommended.", "Cannot wait to go back."],
        neg_close=["Never again.", "Eat somewhere else.", "We will not return."],
    ),
}

# Aspects that only make sense for some subjects.
ASPECT_ONLY = {"the battery life": {"the vacuum", "these headphones", "the new laptop", "this electric toothbrush"}}
FEARED = ["the reviews suggested", "I feared", "my friends warned me", "some reviews claim"]
OPENERS = ["Honestly, ", "Overall, ", "To be honest, ", "In short, ", "All in all, ", "Frankly, ", "Well, "]
DEGREES = ["really ", "very ", "quite ", "surprisingly ", "genuinely ", "incredibly ", "pretty ", "truly "]
# Hedges. Used for the minor clause of a concession and, so that they are no give-away, in main clauses too.
SOFT = {"negative": ["a little ", "slightly ", "somewhat ", "a bit ", ""], "positive": ["pretty ", ""]}


def noun(raw):
    text, _, flag = raw.partition("|")
    return text, flag == "p"


def be(plural, past):
    return ("were" if plural else "was") if past else ("are" if plural else "is")


def degree(rng, adj, pol, p=0.45):
    """Optionally put an intensifier or a hedge before a one-word adjective."""
    if " " in adj or rng.random() > p:
        return adj
    return rng.choice(SOFT[pol] if rng.random() < 0.3 else DEGREES) + adj


class Composer:
    def __init__(self, rng, dom):
        """One review: a single subject and tense throughout."""
        self.rng, self.d = rng, dom
        self.s, self.pl = noun(rng.choice(dom["subjects"]))
        self.past = rng.random() < 0.6

    def pick(self, key):
        return self.rng.choice(self.d[key])

    def subject(self):
        return self.s, self.pl

    def adj(self, pol):
        return self.pick("pos_adj" if pol == POS else "neg_adj")

    def aspect_clause(self, pol, soft=False, avoid=None):
        """'the service was slow' / 'the acting is not wooden' with polarity pol."""
        aspects = [(n, adjs) for n, adjs in self.d["aspects"].items()
                   if self.s in ASPECT_ONLY.get(noun(n)[0], {self.s}) and n != avoid]
        name, (pos, neg) = self.rng.choice(aspects)
        self.last_aspect = name
        a, pl = noun(name)
        v = be(pl, self.past)
        if pol == POS and not soft and self.rng.random() < 0.2:  # 'the ending was not rushed at all'
            return f"{a} {v} not {self.rng.choice(neg)} at all"
        word = self.rng.choice(pos if pol == POS else neg)
        if soft:  # a mild aside: 'a little slow' / 'pretty good'
            return f"{a} {v} {self.rng.choice(SOFT[pol]) if ' ' not in word else ''}{word}"
        return f"{a} {v} {degree(self.rng, word, pol)}"

    def subject_clause(self, pol, imperative=True):
        """A clause judging the whole film/product/place with polarity pol."""
        r, (s, pl) = self.rng, self.subject()
        v = be(pl, self.past)
        kind = r.choice(["copula", "copula", "vp", "notvp", "feel", "negated", "negated", "recommend"])
        if kind == "copula":
            return f"{s} {v} {degree(r, self.adj(pol), pol)}"
        if kind == "vp":
            return f"{s} {self.pick('pos_vp' if pol == POS else 'neg_vp')}"
        if kind == "notvp":
            return f"{s} {self.pick('pos_notvp' if pol == POS else 'neg_notvp')}"
        if kind == "feel":
            return f"{self.pick('pos_feel' if pol == POS else 'neg_feel')} {s}"
        if kind == "negated":
            if pol == POS:  # negate a negative word
                w = self.pick("negatable_neg")
                return r.choice([f"{s} {v} not {w} at all", f"{s} {v} anything but {w}",
                                 f"{s} {v} never {w}", f"{s} {v} not {w}, not even a little"][:3 + (" " not in w)])
            w = self.pick("negatable_pos")
            return r.choice([f"{s} {v} not {r.choice(['very ', 'particularly ', 'exactly ', 'that ', ''])}{w}",
                             f"{s} {v} anything but {w}", f"{s} {v} far from {w}", f"{s} {v} hardly {w}"])
        # recommend; imperatives read badly inside 'X, and Y' or 'X, even if Y'
        if pol == POS:
            return r.choice([f"I would {r.choice(['definitely ', 'happily ', 'highly ', ''])}recommend {s}",
                             f"I cannot recommend {s} enough",
                             f"do yourself a favor and {self.pick('try_verb')} {s}"][:3 if imperative else 2])
        return r.choice([f"I would not recommend {s} to anyone", f"I cannot recommend {s}",
                         f"do yourself a favor and skip {s}", f"save your money and skip {s}"][:4 if imperative else 2])

    def sentence(self, pol):
        """Return (template name, sentence body without final punctuation)."""
        r = self.rng
        opp = NEG if pol == POS else POS
        t = r.choices(["subject", "aspect_and", "but", "although", "even_if", "still", "expect", "compare", "two_aspects"],
                      weights=[5, 2, 3, 1, 1, 1, 2, 2, 1])[0]
        if t == "subject":
            body = self.subject_clause(pol)
        elif t == "aspect_and":
            a, b = self.subject_clause(pol, imperative=False), self.aspect_clause(pol)
            body = f"{a}, and {b}" if r.random() < 0.5 else f"{b}, and {a}"
        elif t == "but":
            body = f"{self.aspect_clause(opp, soft=True)}, but {self.subject_clause(pol)}"
        elif t == "although":
            body = f"although {self.aspect_clause(opp, soft=True)}, {self.subject_clause(pol)}"
        elif t == "even_if":
            body = f"{self.subject_clause(pol, imperative=False)}, even if {self.aspect_clause(opp, soft=True)}"
        elif t == "still":
            body = f"{self.aspect_clause(opp, soft=True)}. Still, {self.subject_clause(pol)}"
        elif t == "two_aspects":
            first = self.aspect_clause(pol)
            body = f"{first} and {self.aspect_clause(pol, avoid=self.last_aspect)}"
        elif t == "expect":
            s, pl = self.subject()
            it = "they" if pl else "it"
            if pol == POS:
                body = r.choice([f"I expected very little from {s}, and I was pleasantly surprised",
                                 f"I went in with low expectations, and {s} blew them away",
                                 f"I had high hopes for {s}, and {it} delivered",
                                 f"I expected {s} to be {self.pick('negatable_neg')}, but {it} {be(pl, True)} {self.adj(POS)}"])
            else:
                body = r.choice([f"I expected a lot from {s}, and I was let down",
                                 f"I had high hopes for {s}, but {it} {be(pl, True)} {self.adj(NEG)}",
                                 f"I expected nothing from {s}, and that is exactly what I got",
                                 f"I expected {s} to be {self.pick('negatable_pos')}, but {it} {be(pl, True)} {self.adj(NEG)}"])
        else:  # compare
            s, pl = self.subject()
            v, ref = be(pl, self.past), self.pick("refs")
            if pol == POS:
                body = r.choice([f"{s} {v} {r.choice(['much ', 'far ', 'even ', 'a lot '])}better than {ref}",
                                 f"{s} {v} not nearly as bad as {r.choice(FEARED)}"])
            else:
                body = r.choice([f"{s} {v} {r.choice(['much ', 'far ', 'even ', 'a lot '])}worse than {ref}",
                                 f"{s} {v} not nearly as good as {ref}"])
        return t, body

    def review(self, pol):
        r = self.rng
        t, body = self.sentence(pol)
        if r.random() < 0.2 and not body.startswith(("although", "do yourself", "save your")):
            body = r.choice(OPENERS) + body
        text = body[0].upper() + body[1:] + ("!" if r.random() < 0.1 else ".")
        if r.random() < 0.15:
            text = f"{self.pick('context')} {text}"
        if r.random() < 0.12:
            text = f"{text} {self.pick('pos_close' if pol == POS else 'neg_close')}"
        return t, text


def normalize(text):
    return re.sub(r"[^a-z ]", "", text.lower()).strip()


def generate(seed, n_train, n_val):
    """Return (train, validation) lists of (text, label, template), balanced per split."""
    rng = random.Random(seed)
    per_label = (n_train + n_val) // 2
    seen, rows = set(), {POS: [], NEG: []}
    while min(len(v) for v in rows.values()) < per_label:
        pol = rng.choice([POS, NEG])
        if len(rows[pol]) >= per_label:
            continue
        t, text = Composer(rng, DOMAINS[rng.choice(sorted(DOMAINS))]).review(pol)
        assert "\t" not in text and '"' not in text and "'" not in text, text
        key = normalize(text)
        if key not in seen:
            seen.add(key)
            rows[pol].append((text, pol, t))
    vpl = n_val // 2
    train = rows[POS][vpl:] + rows[NEG][vpl:]
    val = rows[POS][:vpl] + rows[NEG][:vpl]
    rng.shuffle(train)
    rng.shuffle(val)
    return train, val


def write_tsv(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write("text\tlabel\n")
        f.writelines(f"{text}\t{label}\n" for text, label, _ in rows)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-size", type=int, default=600)
    p.add_argument("--val-size", type=int, default=150)
    p.add_argument("--out-dir", type=Path, default=REPO_ROOT / "data" / "quickstart")
    p.add_argument("--stats", action="store_true", help="print label counts per template")
    args = p.parse_args()
    train, val = generate(args.seed, args.train_size, args.val_size)
    write_tsv(args.out_dir / "train.tsv", train)
    write_tsv(args.out_dir / "validation.tsv", val)
    print(f"wrote {len(train)} train and {len(val)} validation rows to {args.out_dir}")
    if args.stats:
        counts = collections.Counter((t, label) for _, label, t in train + val)
        for t in sorted({t for t, _ in counts}):
            print(f"  {t:12s} positive={counts[t, POS]:4d} negative={counts[t, NEG]:4d}")


if __name__ == "__main__":
    main()
