"""Tasks: data builders and checks for the problems caftkit fine-tunes and evaluates on."""
