"""mesh.placement"""
