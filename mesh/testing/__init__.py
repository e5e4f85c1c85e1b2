"""mesh.testing"""
