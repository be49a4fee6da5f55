"""DRTune and its baselines (ReFL, DRaFT-K, DRaFT-LV, AlignProp) for diffusers pipelines.

One trajectory engine executes every method; a method is a small policy saying which
sampling steps get gradients, whether the denoiser input is detached, and where sampling stops.
"""
