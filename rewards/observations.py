"""The CheXpert observation lists shared by the labelers, the CE metrics and the synthetic data."""

# Order is the CheXpert / CheXbert head order; labelers and metrics index by it.
CHEXPERT_14: tuple[str, ...] = (
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
    "No Finding",
)

# The 13 pathologies and devices: CHEXPERT_14 without "No Finding". On a normal-heavy test set micro F1 over the 14
# rewards writing a normal report for everyone; over these 13 it does not.
PATHOLOGIES_13: tuple[str, ...] = tuple(o for o in CHEXPERT_14 if o != "No Finding")

# The five competition observations used by the "CE-5" variants of the clinical-efficacy metrics.
CHEXPERT_5: tuple[str, ...] = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")

# Label values, as CheXpert/CheXbert encode them.
BLANK, POSITIVE, NEGATIVE, UNCERTAIN = 0, 1, 2, 3
