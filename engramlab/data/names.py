"""Name and value pools for synthetic worlds, plus the real names used by continual worlds.

Every pool is made from hand-picked syllable lists: all combinations are enumerated, de-duplicated
and sorted, then a seeded ``random.Random`` picks the requested number. That makes a pool a pure
function of (sizes, seed) and guarantees unique entries. The distinctive word of every entry
(a name piece, a city/university/brand stem) is also unique across *all* pools, so no token of one
pool can be mistaken for another pool's value.

    pools = make_pools({"first": 400, "middle": 400, "last": 1000, "city": 800,
                        "university": 200, "major": 100, "employer": 500}, seed=0)
"""

from __future__ import annotations

import itertools
import json
import random
import re
from pathlib import Path

from engramlab.errors import EngramError

#: Pool names in generation order (the order matters: earlier pools claim stems first).
POOL_NAMES = ("first", "middle", "last", "city", "university", "major", "employer")
#: The WorldConfig setting that sizes each pool, for error messages.
SIZE_SETTINGS = {"first": "n_first", "middle": "n_middle", "last": "n_last", "city": "n_cities",
                 "university": "n_universities", "major": "n_majors", "employer": "n_employers"}

# --- syllables -------------------------------------------------------------------------------
# Given names: onset + optional middle syllable + ending ("Calrien", "Melia", "Torwyn").
_GIVEN = (
    ["Al", "Am", "An", "Ar", "Bel", "Bri", "Cal", "Cas", "Cor", "Dan", "Dar", "Del", "Ed", "El",
     "Em", "Fen", "Fer", "Gal", "Gil", "Har", "Is", "Jor", "Kal", "Ker", "Lor", "Lu", "Mar", "Mel",
     "Nor", "Or", "Per", "Ral", "Ros", "Sel", "Tam", "Tor", "Val", "Ver", "Wil", "Zan"],
    ["", "a", "e", "i", "o", "ri", "li", "na", "ve", "do"],
    ["a", "an", "en", "el", "ia", "ine", "is", "o", "on", "us", "ette", "ric", "wyn", "da", "ie"],
)
# Family names: stem + optional link + English-ish suffix ("Ashenford", "Marlowe").
_FAMILY = (
    ["Ash", "Black", "Brad", "Bren", "Cald", "Car", "Craw", "Dal", "Dorn", "Dun", "Fair", "Gar",
     "Grims", "Hal", "Hart", "Hask", "Hol", "Kend", "Lang", "Lind", "Marl", "Mor", "Nel", "Ock",
     "Pem", "Prest", "Quin", "Rad", "Ren", "Rut", "Sand", "Stan", "Stock", "Tal", "Thorn", "Vanc",
     "Wal", "Whit", "Wyn", "Yel"],
    ["", "er", "en", "a", "ing", "el", "o"],
    ["son", "ford", "ley", "wood", "ton", "by", "well", "field", "ridge", "man", "worth", "stead",
     "combe", "holt", "wick", "ham", "ez", "ski", "berg", "ard", "ett", "ow"],
)
# Place stems, shared by cities and universities ("Eskenhaven", "Quarora").
_PLACE = (
    ["Ab", "Ard", "Bal", "Bel", "Bram", "Cas", "Cor", "Dor", "Dra", "Eld", "Esk", "Fal", "Glen",
     "Hav", "Ir", "Kel", "Lar", "Mon", "Nar", "Os", "Pel", "Quar", "Riv", "Sal", "Tre", "Ul",
     "Vel", "Wes", "Yar", "Zel"],
    ["", "a", "en", "i", "o", "er"],
    ["ville", "burg", "ton", "ford", "haven", "port", "mouth", "dale", "field", "stead", "wick",
     "bridge", "minster", "chester", "by", "more", "ia", "ora", "ak", "ara"],
)
# Brand stems for employers ("Veltrix", "Norvanta").
_BRAND = (
    ["Ac", "Bly", "Cyn", "Dex", "Ev", "Flu", "Gen", "Hex", "Ion", "Jun", "Kin", "Lum", "Nov",
     "Om", "Pix", "Qu", "Rex", "Syn", "Tek", "Ul", "Vel", "Wex", "Xan", "Zen"],
    ["", "a", "o", "i", "er", "on"],
    ["ix", "ora", "ex", "on", "ia", "io", "ent", "yx", "ico", "ara", "um", "ant", "ivo", "eon"],
)
# Cities optionally carry a prefix word; the empty entries make bare stems the common case.
_CITY_PREFIXES = ["", "", "", "", "", "", "New", "Port", "Lake", "Fort", "East", "West",
                  "North", "South", "Mount", "San"]
_UNIVERSITY_PATTERNS = ["University of {}", "{} University", "{} State University",
                        "{} Institute of Technology", "{} College", "{} Polytechnic Institute",
                        "Royal {} University", "{} School of Science"]
_MAJOR_MODIFIERS = ["", "Applied", "Theoretical", "Computational", "Comparative", "Experimental",
                    "Environmental", "Modern", "Industrial", "Clinical", "Quantitative",
                    "Historical", "Digital"]
_MAJOR_FIELDS = [
    "Mathematics", "Physics", "Chemistry", "Biology", "Geology", "Astronomy", "Economics",
    "Psychology", "Sociology", "Anthropology", "Linguistics", "Philosophy", "History",
    "Literature", "Music", "Architecture", "Statistics", "Ecology", "Genetics", "Neuroscience",
    "Engineering", "Accounting", "Finance", "Marketing", "Journalism", "Law", "Medicine",
    "Nursing", "Pharmacology", "Agriculture", "Oceanography", "Meteorology", "Geography",
    "Archaeology", "Theology", "Education", "Design", "Robotics", "Informatics", "Logistics",
    "Nutrition", "Forestry", "Cartography", "Acoustics", "Optics", "Mechanics", "Botany",
    "Zoology", "Criminology", "Demography"]
_EMPLOYER_SUFFIXES = ["Systems", "Labs", "Industries", "Group", "Foods", "Logistics", "Motors",
                      "Partners", "Analytics", "Bank", "Energy", "Media", "Pharma", "Dynamics",
                      "Works", "Holdings", "Robotics", "Textiles", "Airlines", "Insurance"]


# Joins that read badly ("Amaon", "Veriie", "Junoon", "Rexaix"): vowel pile-ups and clusters.
_AWKWARD = re.compile(r"[aeiouy]{3}|aa|ii|uu|oo|ao|oa|ae|eo|ia[aeiou]|[aeiouy]{2}[xz]"
                      r"|([^aeiouy])\1\1|[^aeiouy]{4}", re.IGNORECASE)


def _candidates(parts: tuple[list[str], ...]) -> list[str]:
    """All pronounceable concatenations of one entry per syllable list, unique and sorted (so
    the later seeded pick does not depend on set iteration order)."""
    words = {"".join(combo) for combo in itertools.product(*parts)}
    return sorted(w for w in words if len(w) >= 3 and not _AWKWARD.search(w))


def _pick_stems(parts, n: int, used: set[str], rng: random.Random, pool: str) -> list[str]:
    """``n`` unique stems not in ``used`` (which is updated); EngramError if too few exist."""
    free = [w for w in _candidates(parts) if w not in used]
    if n > len(free):
        setting = SIZE_SETTINGS[pool]
        raise EngramError(f"{setting}={n} is more than the {len(free)} unique {pool} entries "
                          f"the syllable lists can make; lower {setting}")
    stems = rng.sample(free, n)
    used.update(stems)
    return stems


def _decorate(stems: list[str], patterns: list[str], rng: random.Random) -> list[str]:
    """Wrap each (already unique) stem in a randomly chosen pattern such as "{} College"."""
    return [" ".join(rng.choice(patterns).format(s).split()) for s in stems]


def make_pools(sizes: dict[str, int], seed: int = 0) -> dict[str, list[str]]:
    """Generate every pool. ``sizes`` maps each name in POOL_NAMES to its size.

    Returns a dict pool name -> list of unique strings (names are single words; cities,
    universities, majors and employers may be several words).
    """
    for pool in POOL_NAMES:
        if not isinstance(sizes.get(pool), int) or sizes[pool] < 1:
            raise EngramError(f"{SIZE_SETTINGS[pool]} must be a positive integer, "
                              f"got {sizes.get(pool)!r}")
    rng = random.Random(f"engramlab-pools-{seed}")
    used: set[str] = set()
    pools = {
        "first": _pick_stems(_GIVEN, sizes["first"], used, rng, "first"),
        "middle": _pick_stems(_GIVEN, sizes["middle"], used, rng, "middle"),
        "last": _pick_stems(_FAMILY, sizes["last"], used, rng, "last"),
    }
    city_stems = _pick_stems(_PLACE, sizes["city"], used, rng, "city")
    pools["city"] = _decorate(city_stems, [p + " {}" for p in _CITY_PREFIXES], rng)
    uni_stems = _pick_stems(_PLACE, sizes["university"], used, rng, "university")
    pools["university"] = _decorate(uni_stems, _UNIVERSITY_PATTERNS, rng)
    majors = sorted({f"{m} {f}".strip() for m in _MAJOR_MODIFIERS for f in _MAJOR_FIELDS})
    if sizes["major"] > len(majors):
        raise EngramError(f"n_majors={sizes['major']} is more than the {len(majors)} majors "
                          f"the field lists can make; lower n_majors")
    pools["major"] = rng.sample(majors, sizes["major"])
    brand_stems = _pick_stems(_BRAND, sizes["employer"], used, rng, "employer")
    pools["employer"] = _decorate(brand_stems, ["{} " + s for s in _EMPLOYER_SUFFIXES], rng)
    return pools


def sample_full_names(pools: dict[str, list[str]], n: int, rng: random.Random) -> list[str]:
    """``n`` distinct "First Middle Last" names drawn without replacement from the pools.

    Drawing codes from range(first*middle*last) never builds the list of all combinations, so
    a 160M-name space costs nothing. The caller checks that ``n`` fits.
    """
    n_middle, n_last = len(pools["middle"]), len(pools["last"])
    names = []
    for code in rng.sample(range(len(pools["first"]) * n_middle * n_last), n):
        first, rest = divmod(code, n_middle * n_last)
        middle, last = divmod(rest, n_last)
        names.append(f"{pools['first'][first]} {pools['middle'][middle]} {pools['last'][last]}")
    return names


# --- real names (continual worlds) -------------------------------------------------------------

#: Bundled LRE relation files (package data shipped inside engramlab).
LRE_DIR = Path(__file__).resolve().parent / "facts" / "lre"


def load_real_names(lre_dir: Path | None = None) -> list[str]:
    """Subjects of the bundled ``person_*`` LRE relations: people a pretrained model may know.

    Keeps names of at least two words made of letters, spaces, dots, hyphens and apostrophes
    (a lone "Drake" is not a full name). Returns them sorted and unique.
    """
    lre_dir = Path(lre_dir) if lre_dir is not None else LRE_DIR
    files = sorted(lre_dir.glob("person_*.json"))
    if not files:
        raise EngramError(f"no person_*.json relation files in {lre_dir}; reinstall engramlab "
                          f"(they ship as package data)")
    names: set[str] = set()
    for path in files:
        try:
            samples = json.loads(path.read_text(encoding="utf-8"))["samples"]
            subjects = [s["subject"] for s in samples]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise EngramError(f"{path}: cannot read the samples' subjects ({err}); reinstall "
                              f"engramlab to restore the bundled relation files") from err
        for subject in subjects:
            words = str(subject).split()
            if len(words) >= 2 and all(c.isalpha() or c in " .-'" for c in subject):
                names.add(" ".join(words))
    return sorted(names)
