"""The latent demo: a tiny text-to-image latent diffusion model (StableDiffusionPipeline layout) trained from scratch
on CPU on the procedural shapes data set with its captions (issue 16).

    tokenizer.py   the CLIP BPE tokenizer of the caption words (one token per word)
    models.py      component configs (presets "full", "tiny") and builders
    pool.py        the training images and captions, generated once into the work folder
    train_vae.py   stage 1: AutoencoderKL 128 x 128 x 3 <-> 16 x 16 x 4, scaling_factor
    train_unet.py  stage 2: CLIP text encoder + UNet2DConditionModel jointly on cached latents
    save.py        the pipeline folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/, ...)
    train.py       the command line: ``python -m abcd_edge.demo.latent.train --stage all --work W --out O``

Importing this package imports neither torch nor diffusers.
"""
