"""The synthetic cohort: subjects, admissions, ICU stays, outcomes and CXR films in time.

Everything here is plain data (times are int64 seconds since 1970 in MIMIC's
shifted years 2110-2200).  :func:`build_cohort` draws it from one seeded
``numpy.random.Generator``; the table, image, EHR and ImaGenome writers only read it.

Irregularities are assigned to distinct subjects by *role* with deterministic counts
(``max(1, round(fraction * N))``, while subjects last) so even a 12-subject cohort
has each kind: children, subjects with two admissions, an admission with two ICU
stays, a care-unit change, a stay < 48 h, a stay with a >= 96 h gap between CXRs, a
stay with two CXRs < 8 h apart, and gold-annotated subjects.  Further CXRs
before ``intime`` / after ``outtime``, extra (earlier) AP images in a study, lateral
images and outpatient PA/LATERAL studies are added at random (at least one each).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from data_sharding.constants import LOS_BIN_EDGES, NUM_LOS_BINS
from data_sharding.synth.anatomy import Anatomy
from data_sharding.synth.images import StayPatterns
from data_sharding.synth.progression import StayProgression, simulate_stay

HOUR = 3600
DAY = 24 * HOUR

ROLE_FRACTIONS: tuple[tuple[str, float], ...] = (
    ("child", 0.04),
    ("two_admissions", 0.06),
    ("two_stays_one_admission", 0.03),
    ("careunit_change", 0.05),
    ("short_stay", 0.08),
    ("gap_96h", 0.04),
    ("gap_under_8h", 0.05),
    ("gold", 0.08),
)
MORTALITY_FRACTION = 0.33
# Noise on the EHR mortality signal: deaths with little drift, survivors with a large one.
# (10 % each: with the authors' split of a 300-patient cohort, 20 % / 15 % left the held-out
# mortality score too close to the shuffled-label control for tests/test_learning.py.)
SUDDEN_DEATH_FRACTION = 0.10
SICK_SURVIVOR_FRACTION = 0.10
LONG_STAY_FRACTION = 0.06  # LOS >= 11 days (beyond the last bin edge)

CAREUNITS = (
    "Medical Intensive Care Unit (MICU)",
    "Surgical Intensive Care Unit (SICU)",
    "Medical/Surgical Intensive Care Unit (MICU/SICU)",
    "Cardiac Vascular Intensive Care Unit (CVICU)",
    "Coronary Care Unit (CCU)",
    "Trauma SICU (TSICU)",
    "Neuro Surgical Intensive Care Unit (Neuro SICU)",
)
RACES = (
    "WHITE", "WHITE", "WHITE", "WHITE - OTHER EUROPEAN", "BLACK/AFRICAN AMERICAN",
    "BLACK/CAPE VERDEAN", "HISPANIC/LATINO - PUERTO RICAN", "HISPANIC OR LATINO", "ASIAN",
    "ASIAN - CHINESE", "OTHER", "UNKNOWN", "UNABLE TO OBTAIN", "PATIENT DECLINED TO ANSWER",
)
MARITAL = ("MARRIED", "MARRIED", "SINGLE", "WIDOWED", "DIVORCED", "")
ANCHOR_YEAR_GROUPS = ("2008 - 2010", "2011 - 2013", "2014 - 2016", "2017 - 2019", "2020 - 2022")


@dataclass
class Subject:
    index: int
    subject_id: int
    gender: str
    anchor_age: int
    anchor_year: int
    anchor_year_group: str
    race: str
    language: str
    marital_status: str
    insurance: str
    height_cm: float
    weight_kg: float
    anatomy: Anatomy
    roles: frozenset[str]
    dies: bool
    dod: int | None = None  # seconds; written as a date


@dataclass
class Stay:
    index: int
    subject_index: int
    admission_index: int
    stay_id: int
    intime: int
    outtime: int
    first_careunit: str
    last_careunit: str
    dies: bool  # in-hospital death in this stay's admission
    drift: float  # strength of the pre-death physiological drift (EHR mortality signal)
    resp: float  # respiratory-support latent (EHR / image LOS signal)
    ventilated: bool
    timeline: list[int] = field(default_factory=list)  # film indices of kept APs, by time
    progression: StayProgression | None = None
    patterns: StayPatterns | None = None

    @property
    def los_days(self) -> float:
        return (self.outtime - self.intime) / DAY


@dataclass
class Admission:
    index: int
    subject_index: int
    hadm_id: int
    admittime: int
    dischtime: int
    deathtime: int | None
    edregtime: int | None
    edouttime: int | None
    admission_type: str
    admission_location: str
    discharge_location: str
    hospital_expire_flag: int
    stays: list[int] = field(default_factory=list)


@dataclass
class Film:
    """One image file in MIMIC-CXR-JPG."""

    index: int
    dicom_id: str
    subject_index: int
    study_id: int
    view: str  # AP | PA | LATERAL
    time: int  # seconds (StudyDate + StudyTime)
    millis: int
    width: int
    height: int
    kind: str  # kept (last AP of its study, on a stay timeline) | extra_ap | lateral | pa
    stay_index: int | None = None  # stay whose timeline gives its severities
    position: int | None = None  # position in that timeline


@dataclass
class Cohort:
    seed: int
    image_size: int
    subjects: list[Subject]
    admissions: list[Admission]
    stays: list[Stay]
    films: list[Film]
    gold_subjects: list[int]  # subject indices

    def film_severity(self, film: Film) -> np.ndarray:
        from data_sharding.synth.anatomy import NUM_LOCI

        if film.stay_index is None:
            return np.zeros(NUM_LOCI, dtype=np.float32)
        prog = self.stays[film.stay_index].progression
        return prog.severity[film.position]


def _unique_ids(rng: np.random.Generator, low: int, high: int, n: int) -> list[int]:
    return [int(x) for x in low + rng.choice(high - low, size=n, replace=False)]


def _dicom_ids(rng: np.random.Generator, n: int) -> list[str]:
    out: list[str] = []
    seen: set[str] = set()
    while len(out) < n:
        parts = rng.integers(0, 2**32, size=5, dtype=np.uint64)
        d = "-".join(f"{int(p):08x}" for p in parts)
        if d not in seen:
            seen.add(d)
            out.append(d)
    return out


def _assign_roles(rng: np.random.Generator, n: int) -> list[set[str]]:
    roles: list[set[str]] = [set() for _ in range(n)]
    order = list(rng.permutation(n))
    for role, frac in ROLE_FRACTIONS:
        for _ in range(max(1, round(frac * n))):
            if not order:
                return roles
            roles[int(order.pop(0))].add(role)
    return roles


def _los_days(rng: np.random.Generator, bin_index: int) -> float:
    """A LOS (days) inside LOS bin ``bin_index``; -1 = under 2 days, NUM_LOS_BINS = 11+ days."""
    if bin_index < 0:
        return float(rng.uniform(0.7, 1.95))
    if bin_index >= NUM_LOS_BINS:
        return float(rng.uniform(LOS_BIN_EDGES[-1], 14.0))
    lo, hi = LOS_BIN_EDGES[bin_index], LOS_BIN_EDGES[bin_index + 1]
    return float(rng.uniform(lo + 0.05, hi - 0.05))


def _film_hours(rng: np.random.Generator, los_h: float, roles: set[str]) -> list[float]:
    """CXR times (hours since intime) of the films taken inside one stay."""
    n_target = int(rng.integers(2, 11))
    t = float(rng.uniform(0.3, 10.0))
    hours = [t]
    while len(hours) < n_target:
        if "gap_96h" in roles and len(hours) == 2:
            gap = float(rng.uniform(97.0, 105.0))
        elif rng.random() < 0.05:
            gap = float(rng.uniform(1.5, 7.5))
        else:
            gap = float(rng.uniform(8.5, 30.0))
        if t + gap > los_h - 0.25:
            break
        t += gap
        hours.append(t)
    if "gap_under_8h" in roles:
        hours.append(hours[0] + float(rng.uniform(2.0, 6.0)))
    return sorted(hours)


@dataclass
class _Draw:
    """What the steps of :func:`build_cohort` share: the one generator and the records drawn so far.

    Every step draws from ``rng`` in a fixed order (subjects, id pools, each subject's
    hospital course, the films of each stay, outpatient studies, film ids), so the same
    seed gives the same cohort, byte for byte once written.
    """

    rng: np.random.Generator
    subjects: list[Subject] = field(default_factory=list)
    admissions: list[Admission] = field(default_factory=list)
    stays: list[Stay] = field(default_factory=list)
    hadm_ids: list[int] = field(default_factory=list)
    stay_ids: list[int] = field(default_factory=list)
    bin_cycle: list[int] = field(default_factory=list)
    """LOS bins in a cycle over a permutation, so every bin is populated."""
    film_specs: list[dict] = field(default_factory=list)
    """Films planned before their ids are drawn (subject_index, time, anchor, view, kind, stay, pos)."""

    def add_film(self, spec: dict) -> int:
        self.film_specs.append(spec)
        return len(self.film_specs) - 1


def build_cohort(n_patients: int, seed: int, image_size: int) -> Cohort:
    """Draw the whole cohort (no I/O)."""
    draw = _Draw(np.random.default_rng(np.random.SeedSequence([seed, 0])))
    _draw_subjects(draw, n_patients)
    _draw_id_pools(draw)
    for subj in draw.subjects:
        _draw_hospital_course(draw, subj)
    _plan_stay_films(draw)
    _plan_outpatient_studies(draw)
    films = _draw_films(draw, image_size)
    gold = [s.index for s in draw.subjects if "gold" in s.roles]
    return Cohort(seed, image_size, draw.subjects, draw.admissions, draw.stays, films, gold)


# ----------------------------------------------------------------------------- subjects

def _draw_subjects(draw: _Draw, n: int) -> None:
    """Roles, who dies (MORTALITY_FRACTION), subject ids, then each subject's demographics."""
    rng = draw.rng
    roles = _assign_roles(rng, n)
    dying = np.zeros(n, dtype=bool)
    dying[rng.permutation(n)[: max(1, round(MORTALITY_FRACTION * n))]] = True
    subject_ids = sorted(_unique_ids(rng, 10_000_000, 20_000_000, n))
    for i in range(n):
        draw.subjects.append(_draw_subject(rng, i, subject_ids[i], roles[i], bool(dying[i])))


def _draw_subject(rng: np.random.Generator, index: int, subject_id: int, roles: set[str], dies: bool) -> Subject:
    child = "child" in roles
    gender = "M" if rng.random() < 0.55 else "F"
    age = int(rng.integers(2, 18)) if child else int(np.clip(rng.normal(64, 15), 18, 91))
    if child:
        height = float(rng.uniform(95, 165))
        weight = float(height * rng.uniform(0.2, 0.35))
    elif gender == "M":
        height, weight = float(rng.normal(176, 8)), float(rng.normal(86, 17))
    else:
        height, weight = float(rng.normal(163, 7)), float(rng.normal(72, 16))
    return Subject(
        index=index,
        subject_id=subject_id,
        gender=gender,
        anchor_age=age,
        anchor_year=int(rng.integers(2110, 2190)),
        anchor_year_group=str(rng.choice(ANCHOR_YEAR_GROUPS)),
        race=str(rng.choice(RACES)),
        language="ENGLISH" if rng.random() < 0.88 else "?",
        marital_status=str(rng.choice(MARITAL)) if not child else "SINGLE",
        insurance=str(rng.choice(("Medicare", "Medicaid", "Other"))),
        height_cm=round(height, 1),
        weight_kg=round(max(weight, 8.0), 1),
        anatomy=Anatomy.sample(rng, child=child),
        roles=frozenset(roles),
        dies=dies,
    )


# ----------------------------------------------------------------------------- admissions and stays

def _draw_id_pools(draw: _Draw) -> None:
    """hadm_id / stay_id pools sized by the roles, and the LOS-bin cycle."""
    n_adm = sum(2 if "two_admissions" in s.roles else 1 for s in draw.subjects)
    n_stay = n_adm + sum(1 for s in draw.subjects if "two_stays_one_admission" in s.roles)
    draw.hadm_ids = _unique_ids(draw.rng, 20_000_000, 30_000_000, n_adm)
    draw.stay_ids = _unique_ids(draw.rng, 30_000_000, 40_000_000, n_stay)
    draw.bin_cycle = list(draw.rng.permutation(NUM_LOS_BINS))


def _draw_hospital_course(draw: _Draw, subj: Subject) -> None:
    """A subject's admissions (two for ``two_admissions``), their ICU stays and how each ends."""
    rng = draw.rng
    start = int((subj.anchor_year - 1970) * 365.2425 * DAY + rng.uniform(0, 2.5) * 365 * DAY)
    start -= start % 60
    n_here = 2 if "two_admissions" in subj.roles else 1
    for k in range(n_here):
        dies = subj.dies and k == n_here - 1  # only the last admission can end in death
        adm = _new_admission(draw, subj, start, dies)
        intime = adm.admittime + int(rng.uniform(2, 30) * HOUR)
        st = _new_stay(draw, subj, adm.index, intime, _next_los_bin(draw, subj), dies)
        if "two_stays_one_admission" in subj.roles:
            intime2 = st.outtime + int(rng.uniform(10, 50) * HOUR)
            st = _new_stay(draw, subj, adm.index, intime2, 1 + int(rng.integers(0, 2)), dies)
        _discharge(rng, subj, adm, st, dies)
        start = adm.dischtime + int(rng.uniform(30, 400) * DAY)
    if not subj.dies and rng.random() < 0.1:  # died long after discharge: not in-hospital
        subj.dod = draw.admissions[-1].dischtime + int(rng.uniform(60, 900) * DAY)


def _new_admission(draw: _Draw, subj: Subject, admit: int, dies: bool) -> Admission:
    """An admission at ``admit`` (ED times unless elective); discharge is set by :func:`_discharge`."""
    rng = draw.rng
    elective = rng.random() < 0.15
    adm = Admission(
        index=len(draw.admissions),
        subject_index=subj.index,
        hadm_id=draw.hadm_ids[len(draw.admissions)],
        admittime=admit,
        dischtime=0,
        deathtime=None,
        edregtime=None if elective else admit - int(rng.uniform(1, 6) * HOUR),
        edouttime=None if elective else admit + int(rng.uniform(0.2, 1.0) * HOUR),
        admission_type="ELECTIVE" if elective else str(rng.choice(("EW EMER.", "URGENT", "DIRECT EMER.", "OBSERVATION ADMIT"))),
        admission_location="PHYSICIAN REFERRAL" if elective else str(rng.choice(("EMERGENCY ROOM", "TRANSFER FROM HOSPITAL", "WALK-IN/SELF REFERRAL"))),
        discharge_location="",
        hospital_expire_flag=int(dies),
    )
    draw.admissions.append(adm)
    return adm


def _next_los_bin(draw: _Draw, subj: Subject) -> int:
    """-1 (< 2 days) for ``short_stay``, the last bin for ``gap_96h``, NUM_LOS_BINS (11+ days) at
    LONG_STAY_FRACTION, else the next bin of the cycle."""
    if "short_stay" in subj.roles:
        return -1
    if "gap_96h" in subj.roles:
        return NUM_LOS_BINS - 1
    if draw.rng.random() < LONG_STAY_FRACTION:
        return NUM_LOS_BINS
    b = draw.bin_cycle.pop(0)
    draw.bin_cycle.append(b)
    return int(b)


def _new_stay(draw: _Draw, subj: Subject, adm_index: int, intime: int, los_bin: int, dies: bool) -> Stay:
    """An ICU stay with its LOS, care units and the latents behind the EHR signals:
    ``resp`` follows the LOS bin, ``drift`` the outcome (with sudden deaths and sick survivors)."""
    rng = draw.rng
    los = _los_days(rng, los_bin)
    first = str(rng.choice(CAREUNITS))
    last = first
    if "careunit_change" in subj.roles:
        last = str(rng.choice([c for c in CAREUNITS if c != first]))
    if los_bin < 0:
        resp = -1.5 + rng.normal(0.0, 0.5)
    else:
        resp = (min(los_bin, NUM_LOS_BINS) - 1.5) / 1.5 + rng.normal(0.0, 0.3)
    if dies:
        drift = rng.uniform(0.6, 1.4) if rng.random() < 1 - SUDDEN_DEATH_FRACTION else rng.uniform(0.0, 0.3)
    else:
        drift = abs(rng.normal(0.0, 0.2)) if rng.random() < 1 - SICK_SURVIVOR_FRACTION else rng.uniform(0.4, 1.0)
    ventilated = bool(resp + rng.normal(0.0, 0.7) > 0.2 or (dies and rng.random() < 0.5))
    st = Stay(
        index=len(draw.stays),
        subject_index=subj.index,
        admission_index=adm_index,
        stay_id=draw.stay_ids[len(draw.stays)],
        intime=intime,
        outtime=intime + int(round(los * DAY)),
        first_careunit=first,
        last_careunit=last,
        dies=dies,
        drift=float(drift),
        resp=float(resp),
        ventilated=ventilated,
    )
    draw.stays.append(st)
    draw.admissions[adm_index].stays.append(st.index)
    return st


def _discharge(rng: np.random.Generator, subj: Subject, adm: Admission, last_stay: Stay, dies: bool) -> None:
    """Discharge time and place; a death falls in the ICU (70 %) or hours after it, recorded as
    deathtime (80 %) or only as the subject's dod."""
    if dies:
        in_icu = rng.random() < 0.7
        death = last_stay.outtime if in_icu else last_stay.outtime + int(rng.uniform(6, 72) * HOUR)
        adm.dischtime = death
        adm.deathtime = death if rng.random() < 0.8 else None  # else only dod records it
        adm.discharge_location = "DIED"
        subj.dod = death
    else:
        adm.dischtime = last_stay.outtime + int(rng.uniform(12, 150) * HOUR)
        adm.discharge_location = str(rng.choice(("HOME", "HOME HEALTH CARE", "SKILLED NURSING FACILITY", "REHAB", "CHRONIC/LONG TERM ACUTE CARE")))


# ----------------------------------------------------------------------------- films

def _plan_stay_films(draw: _Draw) -> None:
    """Each stay's CXR times, its progression and image patterns, and its films: the kept AP of each
    study (the stay's timeline), sometimes an earlier extra AP and a lateral.

    Subjects with one stay sometimes (and at least once each) get a CXR before intime / after outtime.
    """
    rng = draw.rng
    stays_per_subject = Counter(st.subject_index for st in draw.stays)
    single_stay = {i for i, k in stays_per_subject.items() if k == 1}
    forced_pre = next((st.index for st in draw.stays if st.subject_index in single_stay), None)
    forced_post = next((st.index for st in reversed(draw.stays) if st.subject_index in single_stay), None)
    for st in draw.stays:
        subj = draw.subjects[st.subject_index]
        los_h = (st.outtime - st.intime) / HOUR
        hours = _film_hours(rng, los_h, set(subj.roles))
        if st.subject_index in single_stay:
            if rng.random() < 0.25 or st.index == forced_pre:
                hours.insert(0, -float(rng.uniform(2.0, 20.0)))
            if rng.random() < 0.15 or st.index == forced_post:
                hours.append(los_h + float(rng.uniform(2.0, 36.0)))
        st.progression = simulate_stay(rng, len(hours), st.dies, st.resp)
        st.patterns = StayPatterns.sample(rng)
        for pos, h in enumerate(hours):
            t = st.intime + int(round(h * HOUR))
            study = {"subject_index": subj.index, "time": t, "anchor": t}
            if rng.random() < 0.12 or (st.index == 0 and pos == 0):
                draw.add_film({**study, "view": "AP", "kind": "extra_ap", "time": t - int(rng.uniform(60, 240)),
                               "stay": st.index, "pos": pos})
            st.timeline.append(draw.add_film({**study, "view": "AP", "kind": "kept", "stay": st.index, "pos": pos}))
            if rng.random() < 0.2:
                draw.add_film({**study, "view": "LATERAL", "kind": "lateral", "time": t + int(rng.uniform(30, 90)),
                               "stay": None, "pos": None})


def _plan_outpatient_studies(draw: _Draw) -> None:
    """Outpatient PA + LATERAL studies before a subject's first admission (15 %, and subject 0)."""
    rng = draw.rng
    first_admit: dict[int, int] = {}
    for a in draw.admissions:
        first_admit.setdefault(a.subject_index, a.admittime)
    for subj in draw.subjects:
        if rng.random() < 0.15 or subj.index == 0:
            t = first_admit[subj.index] - int(rng.uniform(30, 400) * DAY)
            pa = {"subject_index": subj.index, "anchor": t, "stay": None, "pos": None}
            draw.add_film({**pa, "time": t, "view": "PA", "kind": "pa"})
            draw.add_film({**pa, "time": t + int(rng.uniform(20, 80)), "view": "LATERAL", "kind": "lateral"})


def _draw_films(draw: _Draw, image_size: int) -> list[Film]:
    """Study ids (films of one study share its anchor time: the kept AP's or the PA's), dicom ids,
    image widths and acquisition milliseconds for the planned films."""
    rng = draw.rng
    study_keys: dict[tuple[int, int], int] = {}
    key_of: list[tuple[int, int]] = []
    for spec in draw.film_specs:
        key = (spec["subject_index"], spec["anchor"])
        study_keys.setdefault(key, len(study_keys))
        key_of.append(key)
    study_ids = _unique_ids(rng, 50_000_000, 60_000_000, len(study_keys))
    dicoms = _dicom_ids(rng, len(draw.film_specs))
    films: list[Film] = []
    for i, spec in enumerate(draw.film_specs):
        width = int(round(image_size * rng.uniform(0.82, 0.92) / 2) * 2)
        films.append(
            Film(
                index=i,
                dicom_id=dicoms[i],
                subject_index=spec["subject_index"],
                study_id=study_ids[study_keys[key_of[i]]],
                view=spec["view"],
                time=int(spec["time"]),
                millis=int(rng.integers(0, 1000)),
                width=width,
                height=int(image_size),
                kind=spec["kind"],
                stay_index=spec["stay"],
                position=spec["pos"],
            )
        )
    return films
