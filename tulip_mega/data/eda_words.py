"""Word lists for EDA caption augmentation, shipped with the code (no nltk / WordNet download).

Why a small hand-written list: EDA (Wei & Zou, 2019) draws synonyms from WordNet, but a
training job must not download corpora at run time, and captions use a small everyday
vocabulary (objects, colours, sizes, positions, photo words). The synonym sets below cover
the words that dominate alt-text / recaptioned data and the synthetic shapes set; a word
without an entry is simply never replaced. Every set is symmetric (each member lists the
others), so replacement never drifts to an unrelated meaning in two steps.

STOP_WORDS is the usual English function-word list (articles, prepositions, pronouns,
auxiliaries), which EDA's stop-word removal drops.
"""

from __future__ import annotations

__all__ = ["STOP_WORDS", "SYNONYMS"]

STOP_WORDS: frozenset[str] = frozenset(
    """
    a an the and or but if then else of at by for with about against between into through during
    before after above below to from up down in out on off over under again further once here there
    when where why how all any both each few more most other some such no nor not only own same so
    than too very can will just should now is are was were be been being have has had having do does
    did doing i me my myself we our ours ourselves you your yours yourself yourselves he him his
    himself she her hers herself it its itself they them their theirs themselves what which who whom
    this that these those am would could shall may might must as until while because
    """.split()
)

_GROUPS: tuple[tuple[str, ...], ...] = (
    # photo / picture words
    ("photo", "picture", "image", "photograph", "snapshot", "shot"),
    ("background", "backdrop", "setting"),
    ("plain", "simple", "solid", "uniform"),
    ("against", "in front of"),
    # shapes
    ("circle", "disc", "round shape", "ring"),
    ("square", "box", "block"),
    ("triangle", "trigon"),
    ("star", "starburst"),
    ("cross", "plus sign"),
    ("shape", "figure", "form"),
    # colours
    ("red", "crimson", "scarlet"),
    ("green", "emerald", "lime"),
    ("blue", "azure", "navy"),
    ("yellow", "golden", "lemon"),
    ("purple", "violet", "lilac"),
    ("orange", "tangerine", "amber"),
    ("white", "snowy", "ivory"),
    ("black", "dark", "ebony"),
    ("gray", "grey", "ashen"),
    ("brown", "tan", "chocolate"),
    ("pink", "rose", "salmon"),
    # sizes and qualities
    ("big", "large", "huge", "giant"),
    ("small", "little", "tiny", "mini"),
    ("tall", "high", "lofty"),
    ("old", "aged", "vintage"),
    ("new", "modern", "fresh"),
    ("beautiful", "pretty", "lovely", "gorgeous"),
    ("happy", "cheerful", "joyful"),
    ("bright", "vivid", "brilliant"),
    ("close", "near", "nearby"),
    # people and animals
    ("man", "guy", "gentleman"),
    ("woman", "lady"),
    ("person", "individual", "human"),
    ("child", "kid", "youngster"),
    ("people", "folks", "persons"),
    ("dog", "puppy", "hound"),
    ("cat", "kitten", "kitty"),
    ("car", "automobile", "vehicle"),
    ("house", "home", "building"),
    ("road", "street", "path"),
    ("sea", "ocean"),
    ("table", "desk"),
    # verbs
    ("sitting", "seated", "resting"),
    ("standing", "upright"),
    ("walking", "strolling"),
    ("running", "jogging", "sprinting"),
    ("looking", "gazing", "staring"),
    ("holding", "carrying", "gripping"),
    ("playing", "frolicking"),
    ("shows", "depicts", "displays"),
)


def _build() -> dict[str, tuple[str, ...]]:
    out: dict[str, list[str]] = {}
    for group in _GROUPS:
        for word in group:
            out.setdefault(word, []).extend(w for w in group if w != word and w not in out[word])
    return {w: tuple(s) for w, s in out.items()}


# word -> alternatives (single words only as keys; alternatives may be short phrases)
SYNONYMS: dict[str, tuple[str, ...]] = {w: s for w, s in _build().items() if " " not in w}
