"""The page of `python3 mnist_net.py --serve`, in a real browser: headless Chromium driven by
selenium.  Digits are drawn on #pad with the mouse (press, move in small steps, release: real
pointer events), upright, tilted, small and off centre; the answer, the prepared picture, the
probabilities, the saliency and the maps must appear, clear must reset the pad, the test-digit
and mistake buttons must load test images; the training view must grow and then turn into the
pad by itself.

Without selenium, /usr/bin/chromium or /usr/bin/chromedriver the tests are skipped with the
reason (.ci/run installs Debian's chromium and chromium-driver when it runs as root).
With MNIST_NET_REAL_DATA=1 (CI) the served network trains 2 epochs on real MNIST and must read
the drawn digits right (at most 2 wrong); otherwise it trains on small synthetic pictures and
only the mechanics are checked.  MNIST_NET_SCREENSHOTS=1 saves the screenshots into docs/
(page_training.png, page_pad.png, page_why.png); otherwise into a temporary folder.
"""
import math
import os
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest

import mnist_net as m
from conftest import ROOT, idx_images, idx_labels, synthetic_digits
from drawn_digits import STROKES

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
try:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    missing = None
except ImportError:
    missing = "selenium is not installed (pip install -r requirements-test.txt)"
for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
    if missing is None and not os.path.exists(path):
        missing = f"{path} is missing (apt-get install {package})"
pytestmark = pytest.mark.skipif(missing is not None, reason=str(missing))

REAL = bool(os.environ.get("MNIST_NET_REAL_DATA"))
SCREENSHOTS = bool(os.environ.get("MNIST_NET_SCREENSHOTS"))
PAD = 280                        # the pad's side in pixels
WINDOW = (1280, 1000)


# --- the server and the browser ---------------------------------------------------------------
def synthetic_data(folder, n_train, n_test):
    """Small learnable pictures (conftest.synthetic_digits) as the four IDX files; a tenth of
    the test labels are changed, so that the network has mistakes to show."""
    os.makedirs(folder)
    train, test = synthetic_digits(n_train, 0), synthetic_digits(n_test, 1)
    labels = test[1].copy()
    labels[::10] = (labels[::10] + 1) % 10
    for name, content in (("train-images-idx3-ubyte", idx_images(train[0])),
                          ("train-labels-idx1-ubyte", idx_labels(train[1])),
                          ("t10k-images-idx3-ubyte", idx_images(test[0])),
                          ("t10k-labels-idx1-ubyte", idx_labels(labels))):
        with open(os.path.join(folder, name), "wb") as f:
            f.write(content)
    return folder


class Server:
    """`python3 mnist_net.py --serve --port 0 ...` in its own process; its output in files."""

    def __init__(self, folder, *argv):
        self.out_path, self.err_path = os.path.join(folder, "out.txt"), os.path.join(folder, "err.txt")
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.process = subprocess.Popen(
                [sys.executable, os.path.join(ROOT, "mnist_net.py"), "--serve", "--port", "0", *argv],
                cwd=folder, stdout=out, stderr=err, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.url = self.wait_for_address()

    def output(self):
        with open(self.out_path) as out, open(self.err_path) as err:
            return out.read() + err.read()

    def wait_for_address(self, timeout=30):
        """The address the server prints as soon as it listens: 'Serving the page at http://...'."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for line in self.output().splitlines():
                if line.startswith("Serving the page at http://"):
                    return line.split(" at ", 1)[1].strip()
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        self.stop()
        pytest.fail(f"no 'Serving the page at' line from --serve:\n{self.output()[-3000:]}")

    def stop(self):
        """Ctrl-C, by the server's own process id; it must stop cleanly, without a traceback."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                pytest.fail("--serve did not stop within 15 s of Ctrl-C")
        return self.process.returncode


def start_browser(folder):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run",
                 f"--window-size={WINDOW[0]},{WINDOW[1]}", f"--user-data-dir={folder}"):
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory):
    return os.path.join(ROOT, "docs") if SCREENSHOTS else str(tmp_path_factory.mktemp("screenshots"))


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    """The browser opened on a --serve run that is training: (driver, server).  The browser
    starts first, so that the page is there from the first steps of the training."""
    folder = str(tmp_path_factory.mktemp("serve"))
    driver = start_browser(tempfile.mkdtemp(dir=folder))
    if REAL:          # real MNIST: the files in mnist_data/ if they are there, else fetched by the run
        present = all(m.find_idx_file(m.DATA_DIR, name) for name in m.IDX_NAMES.values())
        data = ["--data-dir", m.DATA_DIR, "--no-download"] if present else \
               ["--data-dir", os.path.join(folder, "data")]
        argv = data + ["--epochs", "2"]
    else:             # 120,000 pictures (as 2 epochs of MNIST), synthetic: enough to watch it grow
        argv = ["--data-dir", synthetic_data(os.path.join(folder, "data"), 6000, 300),
                "--no-download", "--epochs", "20"]
    server = Server(folder, *argv, "--quiet")
    try:
        driver.get(server.url)
        yield driver, server
    finally:
        driver.quit()
        code = server.stop()
        output = server.output()
        assert "Traceback" not in output, output[-3000:]
        assert code in (0, 130), output[-3000:]


def wait(condition, timeout=10, every=0.05, message="condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = condition()
        if value:
            return value
        time.sleep(every)
    pytest.fail(f"waited {timeout} s for {message}")


def shown(driver, element_id):
    return driver.find_element(By.ID, element_id).is_displayed()


def attribute(driver, element_id, name):
    return driver.find_element(By.ID, element_id).get_attribute(name)


def canvas_grey(driver, element_id):
    """A canvas's pixels as (H, W, 3) ints, read in the page (sent as one string of bytes)."""
    width, height, text = driver.execute_script(
        "const c = document.getElementById(arguments[0]);"
        "const data = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
        "let text = '';"
        "for (let i = 0; i < data.length; i += 8192)"
        "  text += String.fromCharCode.apply(null, data.subarray(i, i + 8192));"
        "return [c.width, c.height, text];", element_id)
    rgba = np.frombuffer(text.encode("latin-1"), np.uint8).reshape(height, width, 4)
    return rgba[:, :, :3].astype(int)


def prepared_pixels(canvas_values, side):
    """The 28x28 picture drawn big on a canvas, one value per image pixel (each cell's centre)."""
    cell = canvas_values.shape[0] // side
    return canvas_values[cell // 2::cell, cell // 2::cell][:side, :side]


def save(driver, folder, name, full_page=False):
    """A screenshot; full_page: the window made as tall as the page first (then set back)."""
    if full_page:
        height, frame = driver.execute_script(
            "const shown = [...document.querySelectorAll('header, main:not([hidden])')];"
            "return [Math.max(...shown.map(e => e.getBoundingClientRect().bottom + window.scrollY)),"
            "        window.outerHeight - window.innerHeight];")
        driver.set_window_size(WINDOW[0], int(height) + 20 + frame)
    driver.save_screenshot(os.path.join(folder, name))
    if full_page:
        driver.set_window_size(*WINDOW)


# --- drawing --------------------------------------------------------------------------------
def digit_strokes(digit, centre, height, tilt=0.0, slant=0.15):
    """tests/drawn_digits.STROKES[digit] (a box 1 wide, 1.6 tall) on the pad: `height` pixels tall,
    its box centred at `centre` (x, y), leaning like handwriting, turned by `tilt` degrees."""
    scale, turn = height / 1.6, math.radians(tilt)
    strokes = []
    for stroke in STROKES[digit]:
        points = []
        for x, y in stroke:
            x += slant * (0.8 - y)
            dx, dy = (x - 0.5) * scale, (y - 0.8) * scale
            points.append((centre[0] + dx * math.cos(turn) - dy * math.sin(turn),
                           centre[1] + dx * math.sin(turn) + dy * math.cos(turn)))
        strokes.append(points)
    return strokes


def draw(driver, strokes, step=10):
    """Each stroke with the mouse: press, move in steps of at most `step` pixels, release."""
    pad = driver.find_element(By.ID, "pad")
    for stroke in strokes:
        def to_pad(x, y):        # selenium's offsets count from the pad's centre
            return (int(round(min(max(x, 2), PAD - 3) - PAD / 2)),
                    int(round(min(max(y, 2), PAD - 3) - PAD / 2)))
        actions = ActionChains(driver, duration=0)
        actions.move_to_element_with_offset(pad, *to_pad(*stroke[0])).click_and_hold()
        for (x0, y0), (x1, y1) in zip(stroke[:-1], stroke[1:]):
            n = max(1, math.ceil(math.hypot(x1 - x0, y1 - y0) / step))
            for i in range(1, n + 1):
                actions.move_to_element_with_offset(pad, *to_pad(x0 + (x1 - x0) * i / n,
                                                                 y0 + (y1 - y0) * i / n))
        actions.release().perform()


def answer_after(driver, strokes):
    """The answer in #prediction once it includes all the strokes (data-strokes)."""
    wait(lambda: attribute(driver, "prediction", "data-strokes") == str(strokes), 10,
         message=f"an answer including {strokes} strokes")
    return driver.find_element(By.ID, "prediction").text


def clear(driver):
    driver.find_element(By.ID, "clear").click()
    wait(lambda: attribute(driver, "prediction", "data-strokes") == "0", message="the cleared pad")


# The drawings: every digit upright and large, tilted by 15-20 degrees, and small in a corner
# (100 pixels tall: a little over a third of the pad).
CORNERS = ((70, 72), (208, 206), (72, 206), (206, 72))
DRAWINGS = ([(d, (140, 140), 220, 0) for d in range(10)]
            + [(d, (140, 140), 200, (-1) ** d * (15 + d % 3 * 2.5)) for d in range(10)]
            + [(d, CORNERS[d % 4], 100, 0) for d in range(10)])


# --- the tests ------------------------------------------------------------------------------
def test_training_view_grows_and_turns_into_the_pad(page, screenshots):
    driver, server = page
    wait(lambda: shown(driver, "training-view"), 10, message="the training view")
    loss_points = lambda: int(attribute(driver, "loss-curve", "data-points") or 0)
    first = wait(loss_points, 60, message="the first point of the loss curve")
    progress = [driver.find_element(By.ID, "training-progress").text]
    assert progress[0].startswith("Epoch "), progress
    assert len(driver.find_elements(By.CSS_SELECTOR, "#filters canvas")) == 8     # the seed's conv8
    # Until the pad appears by itself: the curves gain new measurements (not a redraw of the
    # same ones).  The screenshot keeps the last view of the training seen before the switch.
    points, end = first, time.monotonic() + 120
    latest = os.path.join(screenshots, "latest_training.png")
    while time.monotonic() < end and shown(driver, "training-view"):
        if loss_points() > points:
            points = loss_points()
            progress.append(driver.find_element(By.ID, "training-progress").text)
            save(driver, screenshots, "latest_training.png", full_page=True)
            if shown(driver, "training-view"):          # it was on the screen all along
                os.replace(latest, os.path.join(screenshots, "page_training.png"))
        time.sleep(0.05)
    if os.path.exists(latest):                          # taken after the switch: not kept
        os.remove(latest)
    assert points >= first + 2, f"the curves grew from {first} to {points} points only"
    assert len(set(progress)) >= 3, progress                      # steps and time left move on
    assert int(attribute(driver, "accuracy-curve", "data-points")) >= points
    wait(lambda: shown(driver, "pad-view"), 5, message="the pad view after the training")
    assert not shown(driver, "training-view")
    assert driver.find_element(By.ID, "prediction").text == "no digit"


def test_drawn_digits_are_answered_with_what_the_network_sees(page, screenshots):
    driver, _ = page
    wait(lambda: shown(driver, "pad-view"), 120, 0.2, "the pad view")
    wrong = []
    for i, (digit, centre, height, tilt) in enumerate(DRAWINGS):
        clear(driver)
        strokes = digit_strokes(digit, centre, height, tilt)
        for n, stroke in enumerate(strokes, 1):          # an answer after every stroke
            draw(driver, [stroke])
            answer = answer_after(driver, n)
        assert answer in [str(d) for d in range(10)], answer
        if answer != str(digit):
            wrong.append(f"{digit} (height {height}, tilt {tilt:g}) read as {answer}")
        if i % 3 == 0 or height < 200:          # everything on the page, for a third of them
            check_what_it_sees(driver, answer)
        if i == len(DRAWINGS) - 3:          # a small 7 in a corner: the preparation at work
            save(driver, screenshots, "page_pad.png", full_page=True)
    if REAL:
        assert len(wrong) <= 2, f"{len(wrong)} of {len(DRAWINGS)} drawings read wrong: {wrong}"


def check_what_it_sees(driver, answer):
    # the ten probabilities: bars that add up to 1, the answer's the longest
    rows = driver.find_elements(By.CSS_SELECTOR, "#probabilities .bar-row")
    assert len(rows) == 10
    widths = [float(row.find_element(By.CSS_SELECTOR, ".bar").value_of_css_property("width")[:-2])
              / float(row.find_element(By.CSS_SELECTOR, ".bar-track").value_of_css_property("width")[:-2])
              for row in rows]
    assert abs(sum(widths) - 1) < 0.02, widths
    assert int(np.argmax(widths)) == int(answer)
    assert "answer" in rows[int(answer)].get_attribute("class")
    # the prepared 28x28 picture: white ink on black, its centre of mass near the middle
    # wherever the digit was drawn (the server boxed, scaled and centred it)
    prepared = canvas_grey(driver, "prepared")[:, :, 0].astype(float)
    ink = prepared >= 128
    assert 0.05 < ink.mean() < 0.5, ink.mean()
    rows_, cols_ = np.indices(prepared.shape)
    side = prepared.shape[0]
    mass = prepared.sum()
    cy, cx = (rows_ * prepared).sum() / mass, (cols_ * prepared).sum() / mass
    assert abs(cy - side / 2) < side / 10 and abs(cx - side / 2) < side / 10, (cy, cx)
    # the saliency: red and blue on white, the ink outlined in black; it explains the answer
    saliency = canvas_grey(driver, "saliency")
    r, g, b = saliency[:, :, 0], saliency[:, :, 1], saliency[:, :, 2]
    cells = prepared_pixels(saliency.astype(int), 28)              # one colour per image pixel
    red = (cells[:, :, 0] > cells[:, :, 2] + 20).sum()              # raises the score
    blue = (cells[:, :, 2] > cells[:, :, 0] + 20).sum()             # lowers it
    assert red + blue >= 20, (red, blue)
    if REAL:                                                        # a trained network uses both
        assert red >= 5 and blue >= 5, (red, blue)
    dark = (r < 60) & (g < 60) & (b < 60)                          # the black outline
    assert dark.mean() > 0.003
    cell = saliency.shape[0] // 28                                  # screen pixels per image pixel
    ink_near = np.zeros((30, 30), bool)                             # ink, grown by one pixel
    for dy in (0, 1, 2):
        for dx in (0, 1, 2):
            ink_near[dy:dy + 28, dx:dx + 28] |= prepared_pixels(prepared, 28) >= 128
    ys, xs = np.nonzero(dark)
    assert ink_near[1 + ys // cell, 1 + xs // cell].all(), "dark pixels away from the ink"
    assert driver.find_element(By.ID, "saliency-caption").text.startswith(f"why {answer}?")
    # the maps after every layer of the seed network, from its first conv to the ten scores
    titles = [t.text for t in driver.find_elements(By.CSS_SELECTOR, "#maps .layer-title")]
    assert len(titles) == 7 and titles[0].startswith("conv8") and titles[-1].startswith("fc10"), titles
    maps = driver.find_elements(By.CSS_SELECTOR, "#maps .layer canvas")
    assert len(maps) >= 3 * 8 + 3                                 # conv, relu, pool maps; dense bars


def test_clicking_a_class_shows_why_not(page):
    driver, _ = page
    wait(lambda: shown(driver, "pad-view"), 120, 0.2, "the pad view")
    clear(driver)
    strokes = digit_strokes(4, (140, 140), 220)
    draw(driver, strokes)
    answer = int(answer_after(driver, len(strokes)))
    before = canvas_grey(driver, "saliency")
    other = (answer + 5) % 10
    driver.find_elements(By.CSS_SELECTOR, "#probabilities .bar-row")[other].click()
    caption = wait(lambda: driver.find_element(By.ID, "saliency-caption").text.startswith(f"why not {other}?"),
                   10, message="the saliency of the class clicked")
    assert caption
    assert "explained" in driver.find_elements(By.CSS_SELECTOR, "#probabilities .bar-row")[other] \
        .get_attribute("class")
    assert np.abs(canvas_grey(driver, "saliency") - before).max() > 50
    assert driver.find_element(By.ID, "prediction").text == str(answer)      # the answer stays


def test_clear_resets_the_pad(page):
    driver, _ = page
    wait(lambda: shown(driver, "pad-view"), 120, 0.2, "the pad view")
    clear(driver)
    strokes = digit_strokes(2, (140, 140), 200)
    draw(driver, strokes[:1])
    answer_after(driver, 1)
    assert (canvas_grey(driver, "pad") < 100).any()
    # a second stroke, and clear while its answer is on its way (the page's fetch made slower
    # by 0.4 s, as over a slow network): that answer must not come back
    driver.execute_script("window.quickFetch = window.fetch; window.fetch = (...request) => "
                          "quickFetch(...request).then(r => new Promise(done => setTimeout(() => done(r), 400)));")
    draw(driver, digit_strokes(1, (220, 140), 120))
    driver.find_element(By.ID, "clear").click()
    for _ in range(2):
        assert attribute(driver, "prediction", "data-strokes") == "0"
        assert driver.find_element(By.ID, "prediction").text == "no digit"
        assert (canvas_grey(driver, "pad") == 255).all()
        assert (canvas_grey(driver, "prepared") == 0).all()
        assert driver.find_elements(By.CSS_SELECTOR, "#maps canvas") == []
        assert driver.find_element(By.ID, "saliency-caption").text == "why?"
        time.sleep(0.6)
    driver.execute_script("window.fetch = window.quickFetch;")
    # two strokes, the second drawn while the first one's answer may still be on its way
    draw(driver, strokes[:1])
    draw(driver, digit_strokes(1, (220, 140), 120))
    assert answer_after(driver, 2) in [str(d) for d in range(10)]


def test_test_digit_and_mistake_buttons(page, screenshots):
    driver, _ = page
    wait(lambda: shown(driver, "pad-view"), 120, 0.2, "the pad view")
    info = lambda: driver.find_element(By.ID, "test-info").text
    for _ in range(3):
        driver.find_element(By.ID, "test-digit").click()
        text = wait(lambda: info().startswith("Test image"), 10, message="a test image")
        text = info()
        label = text.split("labelled ")[1].split(":")[0]
        answer = driver.find_element(By.ID, "prediction").text
        assert (answer == label) == text.endswith("the network is right."), (answer, text)
        assert (canvas_grey(driver, "prepared") > 128).any()
        assert (canvas_grey(driver, "pad") < 128).any()              # the test image on the pad
        driver.find_element(By.ID, "clear").click()
    driver.find_element(By.ID, "mistake").click()
    text = wait(lambda: info().startswith("Test image") and info(), 10, message="a mistake")
    label = text.split("labelled ")[1].split(":")[0]
    answer = driver.find_element(By.ID, "prediction").text
    assert text.endswith(f"the network says {answer}: wrong.") and answer != label, text
    # why not its label?
    driver.find_elements(By.CSS_SELECTOR, "#probabilities .bar-row")[int(label)].click()
    wait(lambda: driver.find_element(By.ID, "saliency-caption").text.startswith(f"why not {label}?"),
         10, message="why not the label")
    save(driver, screenshots, "page_why.png", full_page=True)
    # a stroke on the test image makes it the user's own drawing
    draw(driver, digit_strokes(1, (240, 60), 60))
    answer_after(driver, 1)
    assert info().startswith("Your edit of test image")


def test_fashion_model_names_the_classes(tmp_path):
    """A Fashion-MNIST network: the class names in the bars, a test picture loaded at once."""
    data = synthetic_data(str(tmp_path / "data"), 300, 100)
    driver = start_browser(str(tmp_path / "browser"))
    server = Server(str(tmp_path), "--dataset", "fashion", "--data-dir", data,
                    "--no-download", "--epochs", "1", "--quiet")
    try:
        driver.get(server.url)
        wait(lambda: shown(driver, "pad-view"), 60, 0.2, "the pad view")
        names = m.DATASETS["fashion"].classes
        wait(lambda: driver.find_element(By.ID, "test-info").text.startswith("Test image"), 10,
             message="a test picture loaded by itself")
        bars = [e.text for e in driver.find_elements(By.CSS_SELECTOR, "#probabilities .bar-name")]
        assert bars == list(names)
        assert driver.find_element(By.ID, "prediction").text in names
        assert driver.find_element(By.ID, "test-digit").text == "Test picture"
    finally:
        driver.quit()
        assert server.stop() in (0, 130)
        assert "Traceback" not in server.output()
