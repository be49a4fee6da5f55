"""Guards against reward hacking (docs/tuner.md, "Reward hacking and its guards"): each one a `guards.*` option,
off by default, composable with the others and with every method and model family.

    penalty    KL-style penalty: squared distance of tuned and base denoiser outputs at the trained calls
    pretrain   the denoising (pretraining) loss on image-caption pairs, as ReFL adds it
    normalize  reward normalisation by the base model's score statistics, stored in the run folder
    augment    differentiable augmentations of the images before the reward, from a seeded generator
    select     keep-best / early stop on a guard metric over selection prompts and seeds
and, after training, `python -m tuner.mix` (LoRA strength and mixing, tuner/mix.py).
"""
