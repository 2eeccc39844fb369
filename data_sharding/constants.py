"""Facts about the real datasets and the paper's derived variables.

Single source of truth for region names, disease names, the 38 EHR variables
(MIMIC-IV itemids, physiological ranges, normal values), the 17 demographic
features and the columns each raw MIMIC file must have.  Both the synthetic
generator (:mod:`data_sharding.synth`) and the readers
(:mod:`data_sharding.readers`) import from here so they cannot drift apart.
Sources: the public dataset docs, mimic3-benchmarks, and the authors' preprocessing
(github.com/Chenliu-svg/DiPro ``mimic_data_extract/``); docs/FIDELITY.md lists each rule.
"""
from __future__ import annotations

from dataclasses import dataclass

# --- Chest ImaGenome anatomy: the 10 regions the paper crops (order is the
# region axis of every tensor in the system).
REGIONS: tuple[str, ...] = (
    "left lung",
    "right lung",
    "left lower lung zone",
    "right lower lung zone",
    "left hilar structures",
    "right hilar structures",
    "left costophrenic angle",
    "right costophrenic angle",
    "cardiac silhouette",
    "mediastinum",
)
NUM_REGIONS = len(REGIONS)

# --- The 7 diseases of the progression task (order is the disease axis).
DISEASES: tuple[str, ...] = (
    "atelectasis",
    "enlarged cardiac silhouette",
    "consolidation",
    "pulmonary edema",
    "lung opacity",
    "pleural effusion",
    "pneumonia",
)
NUM_DISEASES = len(DISEASES)

# ImaGenome finding names -> paper disease names.  The authors' pipeline
# matched names literally and so never produced region-level edema labels;
# "pulmonary edema/hazy opacity" is ImaGenome's name for the paper's edema.
IMAGENOME_FINDING_TO_DISEASE: dict[str, str] = {
    "atelectasis": "atelectasis",
    "enlarged cardiac silhouette": "enlarged cardiac silhouette",
    "consolidation": "consolidation",
    "pulmonary edema/hazy opacity": "pulmonary edema",
    "pulmonary edema": "pulmonary edema",
    "lung opacity": "lung opacity",
    "pleural effusion": "pleural effusion",
    "pneumonia": "pneumonia",
}

# The authors' two name lists (github.com/Chenliu-svg/DiPro).  Pair level
# (mimic_data_extract/mimic3benchmark/scripts/process_ImaGenome.py: pair_progression_statistic)
# uses ImaGenome's names, edema included; region level (split_train_and_test.py:
# get_organ_progression_labels_dp / _mort_los) matches the paper's names literally, so
# ImaGenome's "pulmonary edema/hazy opacity" never matches there (`--region-names authors`).
PAIR_LEVEL_FINDING_TO_DISEASE: dict[str, str] = {
    "lung opacity": "lung opacity",
    "pleural effusion": "pleural effusion",
    "atelectasis": "atelectasis",
    "enlarged cardiac silhouette": "enlarged cardiac silhouette",
    "pulmonary edema/hazy opacity": "pulmonary edema",
    "consolidation": "consolidation",
    "pneumonia": "pneumonia",
}
AUTHORS_REGION_FINDING_TO_DISEASE: dict[str, str] = {d: d for d in DISEASES}
#: Attribute categories whose names count as findings of a comparison (process_ImaGenome.py:
#: get_disease_progression_labels); the yes/no polarity is not looked at.
FINDING_CATEGORIES = ("anatomicalfinding", "disease")

# --- Progression label encoding used by the paper.
WORSENED, IMPROVED, NO_CHANGE, NOT_MENTIONED = 0, 1, 2, 3
COMPARISON_TO_LABEL: dict[str, int] = {"worsened": WORSENED, "improved": IMPROVED, "no change": NO_CHANGE}
NUM_PROGRESSION_CLASSES = 3  # label 3 ("not mentioned") is masked everywhere


def reverse_progression_label(label: int) -> int:
    """PAE label reversal: worsened <-> improved; no change / not mentioned kept."""
    return {WORSENED: IMPROVED, IMPROVED: WORSENED}.get(int(label), int(label))


# --- Length of stay bins: LOS days with edges [2, 3, 4, 6, 11), right-open.
LOS_BIN_EDGES: tuple[float, ...] = (2.0, 3.0, 4.0, 6.0, 11.0)
NUM_LOS_BINS = 4


@dataclass(frozen=True)
class EHRVariable:
    name: str
    itemid: int
    source: str  # "chartevents" | "outputevents"
    low: float
    normal: float
    high: float
    kind: str = "numeric"  # "numeric" | "gcs_text" | "fahrenheit" | "inr"


# The 38 variables: name, MIMIC-IV itemid, source table, plausible [low, high] and the normal value
# (imputed before a stay's first measurement).  Order is the feature axis.
EHR_VARIABLES: tuple[EHRVariable, ...] = (
    EHRVariable("Alanine aminotransferase", 220644, "chartevents", 0, 34, 11000),
    EHRVariable("Albumin", 227456, "chartevents", 0, 3.1, 60),
    EHRVariable("Alkaline phosphate", 225612, "chartevents", 0, 106, 4000),
    EHRVariable("Anion gap", 227073, "chartevents", 0, 13, 55),
    EHRVariable("Asparate aminotransferase", 220587, "chartevents", 0, 40, 22000),
    EHRVariable("Bicarbonate", 227443, "chartevents", 0, 25, 66),
    EHRVariable("Bilirubin", 225690, "chartevents", 0, 0.9, 66),
    EHRVariable("Blood urea nitrogen", 225624, "chartevents", 0, 23, 275),
    EHRVariable("Chloride", 220602, "chartevents", 0, 104, 200),
    EHRVariable("Creatinine", 220615, "chartevents", 0, 1, 66),
    EHRVariable("Diastolic blood pressure", 220180, "chartevents", 0, 59, 375),
    EHRVariable("Fraction inspired oxygen", 223835, "chartevents", 0.2, 0.21, 1.1),
    EHRVariable("Glascow coma scale eye opening", 220739, "chartevents", 1, 4, 4, "gcs_text"),
    EHRVariable("Glascow coma scale motor response", 223901, "chartevents", 1, 6, 6, "gcs_text"),
    EHRVariable("Glascow coma scale verbal response", 223900, "chartevents", 1, 4, 5, "gcs_text"),
    EHRVariable("Glucose", 225664, "chartevents", 0, 128, 2200),
    EHRVariable("Heart Rate", 220045, "chartevents", 0, 86, 390),
    EHRVariable("Height", 226730, "chartevents", 0, 170, 275),
    EHRVariable("Hematocrit", 220545, "chartevents", 0, 30.2, 100),
    EHRVariable("Hemoglobin", 220228, "chartevents", 0, 10.2, 30),
    EHRVariable("Magnesium", 220635, "chartevents", 0, 2, 22),
    EHRVariable("Mean blood pressure", 220181, "chartevents", 0, 77, 375),
    EHRVariable("Oxygen saturation", 220277, "chartevents", 0, 98, 150),
    EHRVariable("Partial pressure of carbon dioxide", 220235, "chartevents", 0, 40, 220),
    EHRVariable("Partial thromboplastin time", 227466, "chartevents", 0, 34.4, 150),
    EHRVariable("Platelets", 227457, "chartevents", 0, 208, 2200),
    EHRVariable("Positive end-expiratory pressure", 224700, "chartevents", 0, 6, 30),
    EHRVariable("Potassium", 227442, "chartevents", 0, 4.1, 15),
    EHRVariable("Prothrombin time", 227467, "chartevents", 0, 14.5, 150, "inr"),
    EHRVariable("Respiratory rate", 220210, "chartevents", 0, 19, 330),
    EHRVariable("Sodium", 220645, "chartevents", 0, 142, 250),
    EHRVariable("Systolic blood pressure", 220179, "chartevents", 0, 118, 375),
    EHRVariable("Temperature", 223761, "chartevents", 14.2, 37, 47, "fahrenheit"),
    EHRVariable("Troponin-T", 227429, "chartevents", 0, 0.1, 24),
    EHRVariable("Urine output", 226559, "outputevents", 0, 80, 2445),
    EHRVariable("Weight", 224639, "chartevents", 0, 81.8, 250),
    EHRVariable("White blood cell count", 220546, "chartevents", 0, 9.9, 1100),
    EHRVariable("pH", 223830, "chartevents", 6.3, 7.4, 10),
)
NUM_EHR_VARIABLES = len(EHR_VARIABLES)
assert NUM_EHR_VARIABLES == 38
ITEMID_TO_VARIABLE: dict[int, int] = {v.itemid: i for i, v in enumerate(EHR_VARIABLES)}

# GCS text -> ordinal (mimic3-benchmarks' mapping, MIMIC-IV spellings).
GCS_TEXT_TO_VALUE: dict[int, dict[str, float]] = {
    220739: {  # eye opening
        "4 Spontaneously": 4, "Spontaneously": 4, "3 To speech": 3, "To Speech": 3,
        "2 To pain": 2, "To Pain": 2, "1 No Response": 1, "No Response": 1,
    },
    223901: {  # motor
        "6 Obeys Commands": 6, "Obeys Commands": 6, "5 Localizes Pain": 5, "Localizes Pain": 5,
        "4 Flex-withdraws": 4, "Flex-withdraws": 4, "3 Abnorm flexion": 3, "Abnormal Flexion": 3,
        "2 Abnorm extensn": 2, "Abnormal extension": 2, "1 No Response": 1, "No response": 1,
    },
    223900: {  # verbal
        "5 Oriented": 5, "Oriented": 5, "4 Confused": 4, "Confused": 4,
        "3 Inapprop words": 3, "Inappropriate Words": 3, "2 Incomp sounds": 2,
        "Incomprehensible sounds": 2, "1 No Response": 1, "No Response": 1,
        "1.0 ET/Trach": 1, "No Response-ETT": 1,
    },
}

# --- Demographics (17 features, fixed order).
GENDERS = ("F", "M")
RACE_GROUPS = (
    "ASIAN",
    "BLACK/AFRICAN AMERICAN",
    "HISPANIC/LATINO",
    "OTHER",
    "UNKNOWN/UNABLE TO OBTAIN/PATIENT DECLINED TO ANSWER",
    "WHITE",
)
# MIMIC-IV ``admissions.race`` -> race group: the authors' table (ehr_preprocess.py:
# process_demographic).  A value not in it (e.g. PORTUGUESE) or missing is imputed with the
# most frequent group, as there.
RACE_TO_GROUP: dict[str, str] = {
    **{r: "WHITE" for r in ("WHITE", "WHITE - OTHER EUROPEAN", "WHITE - RUSSIAN", "WHITE - EASTERN EUROPEAN",
                            "WHITE - BRAZILIAN")},
    **{r: "BLACK/AFRICAN AMERICAN" for r in ("BLACK/AFRICAN AMERICAN", "BLACK/CAPE VERDEAN",
                                             "BLACK/CARIBBEAN ISLAND", "BLACK/AFRICAN")},
    **{r: "HISPANIC/LATINO" for r in (
        "HISPANIC/LATINO - PUERTO RICAN", "HISPANIC OR LATINO", "HISPANIC/LATINO - DOMINICAN",
        "HISPANIC/LATINO - GUATEMALAN", "HISPANIC/LATINO - SALVADORAN", "HISPANIC/LATINO - MEXICAN",
        "HISPANIC/LATINO - CUBAN", "HISPANIC/LATINO - COLUMBIAN", "HISPANIC/LATINO - HONDURAN",
        "HISPANIC/LATINO - CENTRAL AMERICAN")},
    **{r: "ASIAN" for r in ("ASIAN", "ASIAN - CHINESE", "ASIAN - SOUTH EAST ASIAN", "ASIAN - ASIAN INDIAN",
                            "ASIAN - KOREAN")},
    **{r: "OTHER" for r in ("OTHER", "AMERICAN INDIAN/ALASKA NATIVE", "NATIVE HAWAIIAN OR OTHER PACIFIC ISLANDER",
                            "SOUTH AMERICAN", "MULTIPLE RACE/ETHNICITY")},
    **{r: "UNKNOWN/UNABLE TO OBTAIN/PATIENT DECLINED TO ANSWER" for r in ("UNKNOWN", "UNABLE TO OBTAIN",
                                                                          "PATIENT DECLINED TO ANSWER")},
}
LANGUAGES = ("?", "ENGLISH")
MARITAL_STATUSES = ("DIVORCED", "MARRIED", "SINGLE", "WIDOWED")
DEMOGRAPHIC_FEATURES: tuple[str, ...] = (
    ("age", "height", "weight")
    + tuple(f"gender_{g}" for g in GENDERS)
    + tuple(f"race_{r}" for r in RACE_GROUPS)
    + tuple(f"language_{l}" for l in LANGUAGES)
    + tuple(f"marital_{m}" for m in MARITAL_STATUSES)
)
NUM_DEMOGRAPHICS = len(DEMOGRAPHIC_FEATURES)
assert NUM_DEMOGRAPHICS == 17

# --- Cohort rules (paper; order and boundaries as in the authors' get_cxr.py: align_cxr_with_stay).
MIN_AGE = 18
MIN_STAY_HOURS = 48.0
IQR_FACTOR = 1.5             # LOS and continuous demographics: Q1 - 1.5 IQR .. Q3 + 1.5 IQR
MIN_CXRS, MAX_CXRS = 2, 14
MIN_CXR_GAP_HOURS = 8.0      # a CXR < 8 h after the previous CXR of the stay is dropped
MAX_CXR_GAP_HOURS = 96.0     # a stay with a gap >= 96 h is dropped
FIRST_CXR_GAP_HOURS = 12.0   # the gap the authors give a stay's first CXR (keeps it, never >= 96 h)
ICU_WINDOW_HOURS = 48        # mortality / LOS inputs: CXRs before 48 h, EHR hours 0..48 (49 steps)
ICU_WINDOW_STEPS = ICU_WINDOW_HOURS + 1

# --- Raw layout (relative to the raw root) and required columns per file.
CXR_ROOT = "mimic-cxr-jpg/2.0.0"
MIMICIV_ROOT = "mimiciv/2.0"
IMAGENOME_ROOT = "chest-imagenome/1.0.0"

CHEXPERT_FINDINGS = (
    "Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum",
    "Fracture", "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion",
    "Pleural Other", "Pneumonia", "Pneumothorax", "Support Devices",
)

REQUIRED_COLUMNS: dict[str, tuple[str, ...]] = {
    "mimic-cxr-2.0.0-metadata": (
        "dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition",
        "Rows", "Columns", "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning",
        "ViewCodeSequence_CodeMeaning", "PatientOrientationCodeSequence_CodeMeaning",
    ),
    "mimic-cxr-2.0.0-chexpert": ("subject_id", "study_id") + CHEXPERT_FINDINGS,
    "patients": ("subject_id", "gender", "anchor_age", "anchor_year", "anchor_year_group", "dod"),
    "admissions": (
        "subject_id", "hadm_id", "admittime", "dischtime", "deathtime", "admission_type",
        "admission_location", "discharge_location", "insurance", "language", "marital_status",
        "race", "edregtime", "edouttime", "hospital_expire_flag",
    ),
    "icustays": ("subject_id", "hadm_id", "stay_id", "first_careunit", "last_careunit", "intime", "outtime", "los"),
    "chartevents": ("subject_id", "hadm_id", "stay_id", "charttime", "storetime", "itemid", "value", "valuenum", "valueuom", "warning"),
    "labevents": (
        "labevent_id", "subject_id", "hadm_id", "specimen_id", "itemid", "charttime", "storetime", "value",
        "valuenum", "valueuom", "ref_range_lower", "ref_range_upper", "flag", "priority", "comments",
    ),
    "outputevents": ("subject_id", "hadm_id", "stay_id", "charttime", "storetime", "itemid", "value", "valueuom"),
    "d_items": ("itemid", "label", "abbreviation", "linksto", "category", "unitname", "param_type", "lownormalvalue", "highnormalvalue"),
    "d_labitems": ("itemid", "label", "fluid", "category"),
    "gold_object_comparison": ("patient_id", "current_image_id", "previous_image_id", "bbox", "label_name", "comparison"),
}

# Task names.  mortality and length_of_stay share one shard set.
TASKS = ("disease_progression", "mortality", "length_of_stay")
TASK_TO_SHARD_DIR = {
    "disease_progression": "disease_progression",
    "mortality": "mortality_los",
    "length_of_stay": "mortality_los",
}
SPLITS = ("train", "val", "test")


def slug(name: str) -> str:
    """Column-safe name: lower case, non-alphanumerics -> '_' ("left lung" -> "left_lung")."""
    out = "".join(c.lower() if c.isalnum() else "_" for c in name)
    while "__" in out:
        out = out.replace("__", "_")
    return out.strip("_")


REGION_SLUGS = tuple(slug(r) for r in REGIONS)
DISEASE_SLUGS = tuple(slug(d) for d in DISEASES)
EHR_VALUE_COLUMNS = tuple(slug(v.name) for v in EHR_VARIABLES)
EHR_MASK_COLUMNS = tuple(f"mask_{c}" for c in EHR_VALUE_COLUMNS)
DEMOGRAPHIC_COLUMNS = tuple(slug(d) for d in DEMOGRAPHIC_FEATURES)
BOX_COLUMNS = tuple(f"box_{r}" for r in REGION_SLUGS)
