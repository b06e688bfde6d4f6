"""Training losses for the pretrain, align and SFT stages."""
