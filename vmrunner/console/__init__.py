"""The VM's consoles: the serial broker shared by every viewer, and the browser console."""
