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

# The five competition observations used by the "CE-5" variants of the clinical-efficacy metrics.
CHEXPERT_5: tuple[str, ...] = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")

# Label values, as CheXpert/CheXbert encode them.
BLANK, POSITIVE, NEGATIVE, UNCERTAIN = 0, 1, 2, 3
