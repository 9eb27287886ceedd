"""Per-class personalisation trainers: Textual Inversion (``textual_inversion``) and DreamBooth LoRA / full
UNet (``dreambooth``), on the shared step loop and loss of ``common``."""
