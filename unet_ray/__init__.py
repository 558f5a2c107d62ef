"""unet_ray: distributed UNet training and search for street scenes on Ray."""
__version__ = "0.1.0"
