"""mesh.dns"""
