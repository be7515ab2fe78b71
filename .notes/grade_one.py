import json, sys, tempfile
from pathlib import Path
sys.path.insert(0, "/work/main/tests/grading"); sys.path.insert(0, "/work/main/tests")
from harness import make_course, student_notebook, submit, autograde
from nfcourse.grade.execute import VERIFICATION_FILE
lesson = sys.argv[1]
root = Path(tempfile.mkdtemp())
course = make_course(root / "course", [lesson])
submit(course, lesson, "s", student_notebook(course, lesson))
print(autograde(course, lesson, "s"))
rec = json.loads((course.autograded_dir / "s" / lesson / VERIFICATION_FILE).read_text())
for v in rec["verdicts"]:
    print(v["grade_id"], v["passed"], v["seconds"], v["message"][:400])
print("review", rec.get("review"))
